from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

os.environ.setdefault("GLOG_minloglevel", "2")
# Collectives in the training tests refuse tensors off the training device, as NCCL does.
os.environ.setdefault("DISCO_NCCL_GUARD", "1")
# Ray Train's controller polls its workers every 2 s; each run waits for a poll to see its end
# and each lost worker for one to notice. Every Ray process the tests start inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The suite's own annotator backend (annotator_plugin.py) must be importable by Ray's workers, as a
# user's plugin module must be on every node: the tests folder on the path of every process.
# What a CI machine may have set for its own work: a cluster to join (the suite starts its own
# instances on loopback) and the network interface of collectives (the tests keep them on lo).
for _name in ("RAY_ADDRESS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
    os.environ.pop(_name, None)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="session")
def ray_local():
    """One local 2-CPU Ray instance for the whole session, like the 2-core machines we run on.

    It declares two fake GPUs, so the GPU pipeline's actors are scheduled as GPU actors; the CPU
    pipeline never asks for them.
    """
    import ray

    from disco.pipeline.cluster import init_ray

    init_ray(num_cpus=2, num_gpus=2)
    yield
    ray.shutdown()


TRAIN_FRAMES = 8  # frames of the training fixture's clip


@pytest.fixture(scope="session")
def triplets(tmp_path_factory, ray_local) -> dict[str, Path]:
    """Training data through the real `preprocess`: a short clip (fine-tuning) and two stills
    (pre-training)."""
    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.demo_data import pan_zoom_frames, write_video
    from disco.pipeline.run import preprocess
    from helpers import save

    root = tmp_path_factory.mktemp("triplets")
    write_video(root / "videos" / "dance.mp4", pan_zoom_frames(data.astronaut(), TRAIN_FRAMES, 96), 30.0)
    video = preprocess(PreprocessConfig(source="video", input=root / "videos", output=root / "video", max_side=96),
                       log=lambda *_: None)
    assert video.manifest["counts"]["rows_written"] == TRAIN_FRAMES
    astronaut = Image.fromarray(data.astronaut()).resize((96, 96))
    save(root / "stills" / "astronaut.png", astronaut)
    save(root / "stills" / "mirrored.png", astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    stills = preprocess(PreprocessConfig(source="images", input=root / "stills", output=root / "images", max_side=96),
                        log=lambda *_: None)
    assert stills.manifest["counts"]["rows_written"] == 2
    return {"video": root / "video", "images": root / "images"}


@pytest.fixture(scope="session")
def two_worker_run(triplets, tmp_path_factory) -> Path:
    """One uninterrupted run of two Ray Train workers (gloo) that several tests compare against:
    the first 4 steps of ``TWO_WORKER_RUN`` (its 16-step schedule), a checkpoint every 2, the
    loss logged every 4; what the tests compare is at step 4. A two-worker run costs most of a
    minute on two cores whatever its length, so the suite trains it once."""
    from disco.train.config import TrainConfig
    from disco.train.launch import train
    from helpers import TWO_WORKER_RUN

    run = tmp_path_factory.mktemp("two-workers") / "run"
    options = {**TWO_WORKER_RUN, "max_steps": 4, "schedule_steps": TWO_WORKER_RUN["max_steps"]}
    train(TrainConfig(**options, data=[str(triplets["video"])], output=str(run)))
    return run

