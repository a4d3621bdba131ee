"""Pose alignment: driving skeletons refitted to the reference person's proportions and place.

A dance driven by someone taller, shorter or standing elsewhere in the picture than the person
of the reference photo makes the model draw that person stretched, squashed or moved. Pose
alignment tools (MusePose's ``pose_align``, the UniAnimate and Champ practice) fix that before
rendering; this module follows their recipe, in pure numpy, on OpenPose body-18 keypoints
(``pipeline/annotators/keypoints.py``; rows of x, y, confidence in pixels, a missing joint all 0):

1. **Per-limb ratios, from the first driving frame.** The 17 limbs of body-18 form a tree rooted
   at the neck (``LIMBS``, the renderer's limbs: neck -> shoulders -> elbows -> wrists, neck ->
   hips -> knees -> ankles, neck -> nose -> eyes -> ears). Each limb's ratio is its length in the
   reference over its length in the first driving frame. A limb missing in either keeps a
   fallback: its mirror limb's ratio (left for right) when that one is known, else the mean of
   the known ratios, else 1.
2. **Every frame, from the neck outward.** A joint keeps its direction from its parent in the
   driving frame and gets the reference's limb length: ``child' = parent' + ratio * (child -
   parent)``, with the first frame's ratios in every frame (so a limb that the dancer
   foreshortens later keeps its own relative change). A joint whose parent is missing in that
   frame hangs from its nearest found ancestor with the path's ratio (length-weighted over the
   path's limbs); a joint without any found ancestor (the neck itself, or a hip when the neck is
   missing) is placed by the global map below. Missing joints stay missing; confidences are kept.
3. **Global place.** The global map ``G(p) = target + scale * (p - source)`` puts the first
   frame's neck on the reference's neck (when both have one; else it moves the aligned first
   frame so that the joints found in both have the reference's centroid). ``scale`` is the
   overall size ratio: the sum of the reference's limb lengths over the driver's, over the limbs
   found in both. The neck's motion through the clip is scaled by it, so a dancer who crosses
   half the picture still crosses half the reference person's body widths, not more.
4. **Hands and face follow.** Each hand's 21 points keep their offsets from the body's wrist
   (the left hand the left wrist), scaled by that side's forearm ratio; the face's points keep
   their offsets from the nose, scaled by the head limbs' mean ratio. Without the wrist (nose)
   in a frame, they are placed by the global map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from disco.pipeline.annotators.keypoints import BODY18_NAMES, NECK
from disco.pipeline.annotators.render import BODY_LIMBS

# The kinematic tree: (parent, child) pairs of body-18 indices, every parent reached before its
# children, rooted at the neck.
LIMBS: tuple[tuple[int, int], ...] = BODY_LIMBS
_PARENT = {child: parent for parent, child in LIMBS}
_LIMB_OF = {child: i for i, (_, child) in enumerate(LIMBS)}
_J = BODY18_NAMES.index


def _mirror_name(name: str) -> str:
    return "l_" + name[2:] if name.startswith("r_") else "r_" + name[2:] if name.startswith("l_") else name


# Each limb's mirror (the same limb on the other side; itself for the neck -> nose limb).
MIRROR = tuple(LIMBS.index((_J(_mirror_name(BODY18_NAMES[a])), _J(_mirror_name(BODY18_NAMES[b]))))
               for a, b in LIMBS)
NOSE = _J("nose")
# Hands are stored left then right (DESIGN.md); each follows its wrist and scales by its forearm.
HAND_WRISTS = (_J("l_wrist"), _J("r_wrist"))
FOREARMS = (LIMBS.index((_J("l_elbow"), _J("l_wrist"))), LIMBS.index((_J("r_elbow"), _J("r_wrist"))))
HEAD_LIMBS = tuple(i for i, (a, _) in enumerate(LIMBS) if a == NOSE or BODY18_NAMES[a].endswith("eye"))


def limb_lengths(body: np.ndarray) -> np.ndarray:
    """The 17 limb lengths of one 18 x 3 skeleton (NaN where either end is missing)."""
    body = np.asarray(body, np.float64).reshape(18, 3)
    out = np.full(len(LIMBS), np.nan)
    for i, (a, b) in enumerate(LIMBS):
        if body[a, 2] > 0 and body[b, 2] > 0:
            out[i] = float(np.hypot(*(body[b, :2] - body[a, :2])))
    return out


@dataclass
class PoseAlignment:
    """What ``fit_alignment`` measured: applied to every frame by ``align_body`` / ``align_hands``."""

    ratios: np.ndarray  # per limb of LIMBS: reference length / first driving frame's length (fallbacks filled)
    driver_lengths: np.ndarray  # the first driving frame's limb lengths (NaN: missing)
    known: np.ndarray  # bool per limb: measured in both (the others hold a fallback)
    scale: float  # overall size ratio reference / driver
    source: np.ndarray  # the global map G(p) = target + scale * (p - source)
    target: np.ndarray
    anchor: str  # "neck" or "centroid": how the first frame was put where the reference stands

    def place(self, points: np.ndarray) -> np.ndarray:
        """The global map of ``... x 2`` points."""
        return self.target + self.scale * (np.asarray(points, np.float64) - self.source)

    def path_ratio(self, joint: int, ancestor: int) -> float:
        """The ratio from ``ancestor`` down to ``joint``: the length-weighted ratio of the path's limbs."""
        limbs = []
        while joint != ancestor:
            limbs.append(_LIMB_OF[joint])
            joint = _PARENT[joint]
        if len(limbs) == 1:
            return float(self.ratios[limbs[0]])
        lengths = self.driver_lengths[limbs]
        if np.all(np.isfinite(lengths)) and lengths.sum() > 0:
            return float((self.ratios[limbs] * lengths).sum() / lengths.sum())
        return float(self.ratios[limbs].mean())

    def to_dict(self) -> dict:
        return {"scale": round(float(self.scale), 6), "anchor": self.anchor,
                "limbs_measured": int(self.known.sum()), "limbs": len(LIMBS),
                "limb_ratios": {f"{BODY18_NAMES[a]}-{BODY18_NAMES[b]}": round(float(r), 6)
                                for (a, b), r in zip(LIMBS, self.ratios)}}


def fit_alignment(reference: np.ndarray, first: np.ndarray, min_limbs: int = 1) -> PoseAlignment | None:
    """Measure the alignment of driving skeletons whose first frame is ``first`` (18 x 3) to the
    ``reference`` skeleton (18 x 3, in the same pixel frame). None when fewer than ``min_limbs``
    limbs are found in both (nothing to measure the reference person by)."""
    reference = np.asarray(reference, np.float64).reshape(18, 3)
    first = np.asarray(first, np.float64).reshape(18, 3)
    ref_len, drv_len = limb_lengths(reference), limb_lengths(first)
    known = np.isfinite(ref_len) & np.isfinite(drv_len) & (np.nan_to_num(drv_len) > 1e-6)
    if known.sum() < min_limbs:
        return None
    scale = float(ref_len[known].sum() / drv_len[known].sum())
    ratios = np.full(len(LIMBS), np.nan)
    # A limb foreshortened in the first driving frame (pointing at the camera) would give a huge
    # ratio and stretch that limb in every later frame: held within 3x of the overall scale.
    ratios[known] = np.clip(ref_len[known] / drv_len[known], scale / 3, scale * 3)
    mean = float(ratios[known].mean())
    for i in np.flatnonzero(~known):
        ratios[i] = ratios[MIRROR[i]] if known[MIRROR[i]] else mean
    alignment = PoseAlignment(ratios, drv_len, known, scale, np.zeros(2), np.zeros(2), "centroid")
    if reference[NECK, 2] > 0 and first[NECK, 2] > 0:
        alignment.source, alignment.target, alignment.anchor = first[NECK, :2].copy(), reference[NECK, :2].copy(), "neck"
        return alignment
    # No neck in one of them: the aligned first frame's joints found in both go onto the
    # reference's (their centroids meet).
    aligned = align_body(first, alignment)
    both = (aligned[:, 2] > 0) & (reference[:, 2] > 0)
    alignment.target = (reference[both, :2] - aligned[both, :2]).mean(axis=0)
    return alignment


def align_body(body: np.ndarray, alignment: PoseAlignment) -> np.ndarray:
    """One driving skeleton (18 x 3) -> the same pose with the reference's limb lengths, placed
    where the reference stands (float32; missing joints stay all 0, confidences are kept)."""
    body = np.asarray(body, np.float64).reshape(18, 3)
    found = body[:, 2] > 0
    out = np.zeros((18, 3), np.float64)
    out[:, 2] = body[:, 2]
    order = [NECK] + [child for _, child in LIMBS]  # parents before children
    for joint in order:
        if not found[joint]:
            continue
        ancestor = _PARENT.get(joint)
        while ancestor is not None and not found[ancestor]:
            ancestor = _PARENT.get(ancestor)
        if ancestor is None:  # the root of what is found: placed by the global map
            out[joint, :2] = alignment.place(body[joint, :2])
        else:
            ratio = alignment.path_ratio(joint, ancestor)
            out[joint, :2] = out[ancestor, :2] + ratio * (body[joint, :2] - body[ancestor, :2])
    out[~found] = 0
    return out.astype(np.float32)


def _follow(points: np.ndarray, anchor: np.ndarray | None, anchor_out: np.ndarray | None, ratio: float,
            alignment: PoseAlignment) -> np.ndarray:
    """``points`` (N x 3) kept at their offsets from ``anchor`` scaled by ``ratio`` around
    ``anchor_out`` (its aligned place); by the global map without an anchor."""
    points = np.asarray(points, np.float64)
    out = np.zeros_like(points)
    found = points[:, 2] > 0
    if anchor is None:
        out[found, :2] = alignment.place(points[found, :2])
    else:
        out[found, :2] = anchor_out + ratio * (points[found, :2] - anchor)
    out[found, 2] = points[found, 2]
    return out.astype(np.float32)


def align_hands(hands: np.ndarray, body: np.ndarray, aligned: np.ndarray, alignment: PoseAlignment) -> np.ndarray:
    """2 x 21 x 3 hands (left, right) of the driving skeleton ``body`` -> following its aligned
    wrists (``aligned`` = ``align_body(body)``), scaled by each side's forearm ratio."""
    hands = np.asarray(hands, np.float32).reshape(2, 21, 3)
    body = np.asarray(body, np.float64).reshape(18, 3)
    out = np.zeros_like(hands)
    for side, (wrist, forearm) in enumerate(zip(HAND_WRISTS, FOREARMS)):
        has = body[wrist, 2] > 0
        out[side] = _follow(hands[side], body[wrist, :2] if has else None, aligned[wrist, :2] if has else None,
                            float(alignment.ratios[forearm]), alignment)
    return out


def align_face(face: np.ndarray, body: np.ndarray, aligned: np.ndarray, alignment: PoseAlignment) -> np.ndarray:
    """N x 3 face points following the aligned nose, scaled by the head limbs' mean ratio."""
    body = np.asarray(body, np.float64).reshape(18, 3)
    has = body[NOSE, 2] > 0
    return _follow(np.asarray(face, np.float32).reshape(-1, 3), body[NOSE, :2] if has else None,
                   aligned[NOSE, :2] if has else None, float(alignment.ratios[list(HEAD_LIMBS)].mean()), alignment)


def align_sequence(reference: np.ndarray, bodies: list, hands: list | None = None, faces: list | None = None,
                   min_limbs: int = 1):
    """Align a driving sequence to ``reference`` (18 x 3). ``bodies``: one 18 x 3 skeleton per
    frame, or None for a frame with nobody; ``hands`` / ``faces``: the same per frame (or None).
    The ratios are measured on the first frame that has a skeleton. Returns (bodies, hands, faces,
    alignment): the inputs unchanged and alignment None when it could not be measured."""
    # The first frame with a limb to measure (a stored frame without a pose has all-zero keypoints).
    first = next((b for b in bodies if b is not None and np.isfinite(limb_lengths(b)).any()), None)
    alignment = None if first is None else fit_alignment(reference, first, min_limbs)
    if alignment is None:
        return bodies, hands, faces, None
    out_bodies, out_hands, out_faces = [], None if hands is None else [], None if faces is None else []
    for t, body in enumerate(bodies):
        aligned = None if body is None else align_body(body, alignment)
        out_bodies.append(aligned)
        if hands is not None:
            out_hands.append(None if hands[t] is None or body is None else align_hands(hands[t], body, aligned, alignment))
        if faces is not None:
            out_faces.append(None if faces[t] is None or body is None else align_face(faces[t], body, aligned, alignment))
    return out_bodies, out_hands, out_faces, alignment
