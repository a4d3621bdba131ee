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


class _Backend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(bind_gloo_to_node_address)
        super().on_start(worker_group, backend_config)


@dataclass
class WorkerTorchConfig(TorchConfig):
    """Ray Train's ``TorchConfig``, its workers' gloo bound as above before the group starts."""

    @property
    def backend_cls(self):
        return _Backend
