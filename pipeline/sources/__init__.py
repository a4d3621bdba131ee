"""The data set sources (tiktok, coco, shhq, deepfashion2, laion, or any ``--manifest``): their
manifests, listing, and units of work. The generic ``video`` and ``images`` sources stay in
``disco.pipeline.sources.generic``."""

from __future__ import annotations

from pathlib import Path

from disco.pipeline.sources.dataset_manifest import DatasetManifest, builtin_manifest, load_manifest
from disco.pipeline.sources.generic import Listing, list_inputs

GENERIC_SOURCES = ("video", "images")


def resolve_manifest(cfg) -> DatasetManifest:
    """The manifest a run uses: ``--manifest`` if given, else the built-in one for ``--source``,
    with the split rule ``--split-rule`` names (default: the manifest's own)."""
    manifest = load_manifest(cfg.manifest) if cfg.manifest is not None else builtin_manifest(cfg.source)
    return manifest.with_split_rule(getattr(cfg, "split_rule", None))


def list_source(cfg, log=print) -> Listing:
    if cfg.source in GENERIC_SOURCES:
        return list_inputs(cfg.source, Path(cfg.input), cfg.split)
    from disco.pipeline.sources.listing import list_dataset

    manifest = resolve_manifest(cfg)
    listing = list_dataset(manifest, Path(cfg.input), cfg.source,
                           split_override=None if cfg.split_from_manifest else cfg.split,
                           coco_single_person=cfg.coco_single_person)
    _compare_with_expected(manifest, listing, log)
    return listing


def _compare_with_expected(manifest: DatasetManifest, listing: Listing, log) -> None:
    """A word when the count is far from what the data set should hold (a wrong --input is the usual
    cause); a subset is fine, so this never stops the run."""
    expected = manifest.expected.clips or manifest.expected.images
    listed = len(listing.items)
    if listed == 0:
        patterns = "; ".join(f"{lay.name}: {', '.join(lay.pattern)}" for lay in manifest.layouts)
        log(f"no {manifest.name} inputs matched the manifest's layouts ({patterns}); "
            "--input must be the folder these patterns start from")
    elif expected and listed < expected // 2:
        log(f"listed {listed} {manifest.name} inputs; the full data set holds about {expected} "
            f"({manifest.origin}), so this is a part of it")
