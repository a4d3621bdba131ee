"""The embedded MediaPipe annotators on real photographs, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from skimage import data

from disco.pipeline.annotators import FrameAnnotator
from disco.pipeline.annotators.mediapipe_backend import is_close_up


@pytest.fixture(scope="module")
def annotator():
    a = FrameAnnotator("mediapipe", "mediapipe", hands=False, min_visibility=0.5, min_mask_area=0.01)
    yield a
    a.close()


def _hopper() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def test_half_body_photo_uses_blazepose_mask(annotator):
    result = annotator.annotate(data.astronaut())
    assert result.present and result.matte.model == "blazepose"
    assert result.pose is not None and result.pose.body.shape == (18, 3)


def test_close_up_uses_selfie_segmentation(annotator):
    frame = _hopper()
    result = annotator.annotate(frame)
    assert result.present and result.matte.model == "selfie_segmentation"
    person = result.matte.alpha >= 128
    assert 0.3 < person.mean() < 0.9
    # The face (centre, upper third) is person; the flag in the top-left corner is not.
    h, w = person.shape
    assert person[h // 3, w // 2] and not person[h // 10, w // 20]


def test_no_person_in_a_cup_of_coffee(annotator):
    result = annotator.annotate(data.coffee())
    assert not result.present and result.pose is None


def test_close_up_rule():
    lm = np.zeros((33, 3))
    lm[11, 0], lm[12, 0] = 0.85, 0.15
    assert is_close_up(lm)
    lm[23, 2] = 0.9  # a visible hip: not a close-up
    assert not is_close_up(lm)
    lm[23, 2], lm[11, 0] = 0.0, 0.5  # narrow shoulders: not a close-up
    assert not is_close_up(lm)
