"""Miniature copies of each data set's published layout, built from real photos that ship with
installed packages: people (the astronaut, Grace Hopper) and no people (coffee, a rocket)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from disco.pipeline.demo_data import _grace_hopper, pan_zoom_frames

SIDE = 256


def photo(name: str, side: int = SIDE) -> Image.Image:
    arrays = {"astronaut": data.astronaut, "coffee": data.coffee, "rocket": data.rocket, "hopper": _grace_hopper}
    image = Image.fromarray(arrays[name]())
    image.thumbnail((side, side))
    return image


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def jpeg_bytes(name: str) -> bytes:
    buf = io.BytesIO()
    photo(name).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiktok(root: Path, frames: int = 6) -> Path:
    """Two sequences of the public release (00001 train, 00002 on the held-out list), one of
    coffee with nobody in it, with masks/ and densepose/ beside images/; and one .mp4 sequence."""
    from disco.pipeline.demo_data import write_video

    zoom = pan_zoom_frames(data.astronaut(), frames, 160)
    for seq in ("00001", "00002"):
        for k, frame in enumerate(zoom):
            save(root / seq / "images" / f"{k:04d}.png", Image.fromarray(frame))
            save(root / seq / "masks" / f"{k:04d}.png", Image.fromarray(np.zeros((160, 160), np.uint8)))
            save(root / seq / "densepose" / f"{k:04d}.png", Image.fromarray(frame))
    for k in range(2):
        save(root / "00003" / "images" / f"{k:04d}.png", photo("coffee", 160))
    write_video(root / "videos" / "00013.mp4", zoom, 30.0)
    (root / "README.txt").write_text("not a sequence")
    return root


def coco(root: Path) -> Path:
    """train2017 (astronaut: 1 person, coffee: annotated 1 person by mistake, hopper: 2 persons +
    a crowd), val2017 (hopper: 1 person), person_keypoints for train and instances for val."""
    files = {"train2017": {1: "astronaut", 2: "coffee", 3: "hopper", 5: "rocket"}, "val2017": {4: "hopper"}}
    persons = {1: 1, 2: 1, 3: 2, 4: 1, 5: 0}
    for split, images in files.items():
        for image_id, name in images.items():
            save(root / split / f"{image_id:012d}.jpg", photo(name))
        annotations = []
        for image_id in images:
            annotations += [{"id": 100 * image_id + k, "image_id": image_id, "category_id": 1, "iscrowd": 0}
                            for k in range(persons[image_id])]
        if split == "train2017":
            annotations.append({"id": 999, "image_id": 3, "category_id": 1, "iscrowd": 1})
            annotations.append({"id": 998, "image_id": 5, "category_id": 3, "iscrowd": 0})  # a car
        kind = "person_keypoints" if split == "train2017" else "instances"
        doc = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in images], "annotations": annotations,
               "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{kind}_{split}.json").write_text(json.dumps(doc))
    return root


def shhq(root: Path) -> Path:
    save(root / "no_segment" / "000001.png", photo("astronaut"))
    save(root / "no_segment" / "000002.png", photo("rocket"))
    # segments/ holds label maps, not photos: it must not be read.
    save(root / "segments" / "000001.png", Image.fromarray(np.full((SIDE, SIDE // 2, 3), 3, np.uint8)))
    return root


def deepfashion2(root: Path) -> Path:
    save(root / "train" / "image" / "000001.jpg", photo("hopper"))
    (root / "train" / "annos").mkdir(parents=True)
    (root / "train" / "annos" / "000001.json").write_text(json.dumps({"source": "user", "pair_id": 1}))
    save(root / "validation" / "image" / "000002.jpg", photo("astronaut"))  # its annos/ is missing
    save(root / "validation" / "image" / "000003.jpg", photo("coffee"))
    return root


def _add(tar: tarfile.TarFile, name: str, payload: bytes, **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload))


def laion(root: Path) -> Path:
    """One WebDataset shard with two good samples, a caption without an image and three members
    that try to get out (``..``, an absolute path, a symlink); and a Parquet file of local paths."""
    root.mkdir(parents=True, exist_ok=True)
    shard = root / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        _add(tar, "000000000.jpg", jpeg_bytes("astronaut"))
        _add(tar, "000000000.json", json.dumps({"caption": "an astronaut"}).encode())
        _add(tar, "000000000.txt", b"an astronaut")
        _add(tar, "../evil.jpg", jpeg_bytes("hopper"))
        _add(tar, "000000001.jpg", jpeg_bytes("coffee"))
        _add(tar, "000000001.txt", b"coffee")
        _add(tar, "/tmp/disco-absolute-evil.jpg", jpeg_bytes("hopper"))
        _add(tar, "000000002.txt", b"a caption whose image failed to download")
        link = tarfile.TarInfo("000000003.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    import pyarrow as pa
    import pyarrow.parquet as pq

    save(root / "local" / "a.png", photo("hopper"))
    save(root / "local" / "b.png", photo("rocket"))
    pq.write_table(pa.table({"path": ["local/a.png", "local/b.png", "local/gone.png"],
                             "key": ["p0", "p1", "p2"], "caption": ["hopper", "rocket", "lost"]}),
                   root / "paths.parquet")
    return root
