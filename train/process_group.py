"""The training workers' process group: Ray Train's torch setup, with gloo bound to the address
the other nodes reach this one on.

Left alone, gloo binds (and tells its peers) the address this machine's host name resolves to.
On many Linux images (Debian and Ubuntu's /etc/hosts) that is 127.0.1.1: a peer on another node
then dials its own loopback, and a multi-node run on the CPU, or of workers sharing a GPU (gloo),
never forms its group (it waits, then fails after the process group's timeout). Ray knows the
address each node is reached at; the interface that holds it is the one to bind. NCCL picks its
interfaces by rules of its own (never loopback), and a ``GLOO_SOCKET_IFNAME`` the user set wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from disco.pipeline.cluster import interface_of
from disco.pipeline.errors import STOPS_THE_RUN, ConfigError

GLOO_INTERFACE_ENV = "GLOO_SOCKET_IFNAME"


def bind_gloo_to_node_address() -> str | None:
    """On a training worker, before its process group starts: ``GLOO_SOCKET_IFNAME`` set to the
    interface that holds this node's Ray address, unless already set (by the user, or on loopback
    by the cluster's worker settings). Returns the interface gloo binds, where known."""
    if os.environ.get(GLOO_INTERFACE_ENV):
        return os.environ[GLOO_INTERFACE_ENV]
    import ray

    name = interface_of(ray.util.get_node_ip_address())
    if name is not None:  # an address on no interface here (behind NAT): gloo's own choice stands
        os.environ[GLOO_INTERFACE_ENV] = name
    return name


# Set on the workers of a group that cannot train (``cuda_problem``): the training loop raises it
# as its first act, a worker's error, after which Ray Train frees the group's resources (an error
# raised while the group starts is the controller's, after which Ray 2.60 kept its placement group).
WORKER_PROBLEM_ENV = "DISCO_WORKER_PROBLEM"


def cuda_problem() -> str | None:
    """On a training worker Ray gave GPUs (``--use-gpu``), why PyTorch cannot use them, or None.
    Where it sees none (a node whose ``ray start --num-gpus`` names GPUs it lacks, a broken NVIDIA
    driver, a PyTorch without CUDA), every restart fails alike (NCCL: "no GPUs found")."""
    import socket

    import torch

    from disco.model.precision import no_cuda_reason

    if torch.cuda.is_available():
        return None
    given = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return (f"{STOPS_THE_RUN} a training worker on node {socket.gethostname()} was given GPU {given or '(none named)'} "
            f"by Ray, and PyTorch there finds {no_cuda_reason()}: that node's Ray offers GPUs it cannot use (its `ray "
            "start --num-gpus`, or its NVIDIA driver); train without --use-gpu, or fix the node")


def _remember_problem(problem: str) -> None:
    os.environ[WORKER_PROBLEM_ENV] = problem


def raise_worker_problem() -> None:
    """In the training loop, first: the problem the group's start found (``WORKER_PROBLEM_ENV``)."""
    problem = os.environ.pop(WORKER_PROBLEM_ENV, None)
    if problem:
        raise ConfigError(problem)


class _Backend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        if worker_group.get_resources_per_worker().get("GPU", 0) > 0:
            problems = [problem for problem in worker_group.execute(cuda_problem) if problem]
            if problems:  # no process group (NCCL would fail it): the loop stops the run
                worker_group.execute(_remember_problem, problems[0])
                return
        worker_group.execute(bind_gloo_to_node_address)
        super().on_start(worker_group, backend_config)


@dataclass
class WorkerTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig``, its workers' gloo bound as above before the group starts."""

    @property
    def backend_cls(self):
        return _Backend
