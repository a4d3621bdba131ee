from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

os.environ.setdefault("GLOG_minloglevel", "2")


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

    from disco.pipeline.run import init_ray

    init_ray(num_cpus=2, num_gpus=2)
    yield
    ray.shutdown()
