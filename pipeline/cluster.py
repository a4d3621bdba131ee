"""Where the preprocessing and training jobs run: a Ray cluster joined by address (or
``$RAY_ADDRESS``, as ``ray job submit`` sets it), or a private local instance kept on loopback;
the worker settings every job ships, merged with a job's own runtime env."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

from disco.pipeline.errors import ConfigError

# Quiet the MediaPipe / TFLite start-up chatter in every Ray worker, and SAM 2's progress bar per
# video unit (a job's workers forward their output to the driver's log).
WORKER_ENV = {"GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
CONNECT_TIMEOUT_S = 60.0  # how long an unreachable --ray-address is tried ($DISCO_RAY_TIMEOUT)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             log=None) -> None:
    """Connect to the cluster at ``address`` (or ``$RAY_ADDRESS``, which ``ray job submit`` sets),
    or start a private local instance on loopback. Without an address a private instance is
    started even where ``ray start`` runs a cluster on this machine (said in one line): pass
    ``--ray-address auto`` to use that cluster."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    check_ray_address(address)  # (before the return: the address is refused wherever it comes)
    if ray.is_initialized():
        return
    # Worker output (MediaPipe's start-up chatter) stays in Ray's log files; failures still
    # surface as exceptions through Ray Data.
    common = dict(logging_level=logging.ERROR, log_to_driver=False)
    if address:
        address = _resolve_auto(address)
        _wait_until_reachable(address, _connect_timeout())
        nodes = _cluster_nodes(address)
        _check_on_a_node(address, nodes)
        # A cluster on this machine's loopback (as tests start them): stay on loopback, or Ray
        # dials the interface address instead, where nothing listens.
        loopback = _on_loopback(address, nodes)
        with loopback_only() if loopback else contextlib.nullcontext():
            ray.init(address=address, runtime_env=_runtime_env(loopback), **common)
        return
    running = _cluster_on_this_machine()
    if running and log is not None:
        log(f"this machine runs a Ray cluster ({running}); starting a private instance anyway: pass "
            "--ray-address auto to run on that cluster")
    with loopback_only(), _free_agent_port():
        # "local": a new instance, never the cluster `ray start` recorded (``ray_address_file``).
        ray.init(address="local", num_cpus=local_cpus() if num_cpus is None else num_cpus, num_gpus=num_gpus,
                 include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=_runtime_env(True), **common)


SUBMIT_HINT = "`ray job submit --address http://HEAD:8265 -- disco-cli ...`"


def check_ray_address(address: str | None) -> None:
    """Refuses, in one line and before anything is written, the two cluster addresses a command
    cannot run on. The dashboard's ``http://HEAD:8265`` (the one Ray's docs have users export as
    RAY_ADDRESS for ``ray job submit``): ``ray.init`` raises a traceback on it. A Ray Client
    ``ray://`` address: the driver would run here, off the cluster, writing the run's journal,
    manifest and checkpoints where no worker writes, and a ``ray://localhost`` port-forward would
    be taken for a cluster on this machine's loopback (the training workers' sockets kept on it)."""
    if not address:
        return
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme in ("http", "https"):
        raise ConfigError(f"--ray-address / RAY_ADDRESS {address} is a Ray dashboard's address, where jobs are "
                          f"submitted: submit the command there ({SUBMIT_HINT.replace('http://HEAD:8265', address)}), "
                          "or on a node of the cluster give its GCS address (HEAD:6379) or auto")
    if scheme == "ray":
        raise ConfigError(f"--ray-address / RAY_ADDRESS {address}: Ray Client is not supported (its driver runs on "
                          "this machine, off the cluster, and a run's journal, manifest and checkpoints are written "
                          f"by the driver beside its workers' outputs): submit the command with {SUBMIT_HINT}, or "
                          "run it on a node of the cluster")


def _resolve_auto(address: str) -> str:
    """``auto`` as the address of the cluster to join: RAY_ADDRESS (where ``ray job submit`` ran
    the command), else the one ``ray start`` recorded on this machine, as it was recorded (the
    wait for it to answer follows, as for an address given). Left to Ray, a loopback address
    became the machine's interface address, where a cluster on loopback does not answer (the
    driver waited there for ever), and with nothing recorded Ray joined any instance it found
    running here (another command's private one)."""
    if address != "auto":
        return address
    given = os.environ.get("RAY_ADDRESS", "").strip()
    if given and given != "auto":
        check_ray_address(given)  # (a dashboard's http:// address, as Ray's job CLI has it exported)
        return given
    recorded = _recorded_cluster()
    if recorded is None:
        raise ClusterUnreachable(
            f"--ray-address auto: no cluster recorded by `ray start` on this machine ({ray_address_file()}; a "
            "cluster started with --temp-dir records it there); start one (`ray start --head`), or give the "
            "cluster's address (HEAD:6379)")
    return recorded


ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE


def _cluster_nodes(address: str) -> list | None:
    """The nodes the cluster's GCS knows (Ray's node records), or None where that cannot be
    asked (``auto``, a Ray Client address, Ray's internal client changed or failed)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return None
    try:
        from ray._raylet import GcsClient

        return list(GcsClient(address=address).get_all_node_info(timeout=10).values())
    except Exception:  # noqa: BLE001 - see above
        return None


def _check_on_a_node(address: str, nodes: list | None) -> None:
    """A driver joins a cluster through a Ray node on its own machine (its raylet). From a machine
    that is none of the cluster's nodes (a login node, a laptop), ``ray.init`` looks for one for a
    minute and then raises a traceback: said at once, in one line, with what to do instead."""
    if nodes is None:  # nothing known: ray.init decides
        return
    try:
        import psutil
        from ray._private.services import find_node_ids

        here = set(find_node_ids())  # the raylets running on this machine that `ps` shows
        addresses = {a.address for found in psutil.net_if_addrs().values() for a in found} - set(LOOPBACK_HOSTS)
    except Exception:  # noqa: BLE001 - Ray's internals changed: ray.init decides
        return
    # By its raylet, or by this machine's address (how Ray before 2.5x found the driver's node,
    # and a container that shares the node's network but not its processes).
    if not any(node.node_id.hex() in here or node.node_manager_address in addresses
               for node in nodes if node.state == ALIVE):
        raise ClusterNotHere(
            f"--ray-address {address}: no node of that Ray cluster runs on this machine ({socket.gethostname()}), "
            "and a driver must run on one: run the command on a node of the cluster (the head), or submit it "
            f"from here with {SUBMIT_HINT}")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def _on_loopback(address: str, nodes: list | None) -> bool:
    """Whether the cluster at ``address`` lives on this machine's loopback: a loopback address,
    and every node the GCS knows (``nodes``; None: not known, decided by the address) at
    127.0.0.1. The head node of a real cluster is reachable at localhost too, and there the
    driver and the training workers' gloo / NCCL sockets must not be kept on loopback: the other
    nodes could not reach them."""
    if _host_port(address)[0] not in LOOPBACK_HOSTS:
        return False
    return nodes is None or all(node.node_manager_address in LOOPBACK_HOSTS for node in nodes)


def _connect_timeout() -> float:
    raw = os.environ.get("DISCO_RAY_TIMEOUT", "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"DISCO_RAY_TIMEOUT={raw!r}: give the seconds to wait for a cluster, a number >= 0")
    return value


class ClusterUnreachable(ConfigError):
    """--ray-address names a cluster that does not answer."""


class ClusterNotHere(ConfigError):
    """--ray-address names a cluster none of whose nodes runs on this machine."""


def _runtime_env(loopback: bool = False) -> dict:
    """Our worker settings, minus any variable a job's own runtime env sets: Ray refuses to merge
    a job's runtime env (``ray job submit --runtime-env-json``) with a driver's that names the same
    variable, and the user's choice wins. ``loopback``: a private instance, or a cluster on this
    machine's loopback: the training workers' gloo and NCCL sockets stay on the loopback interface
    too (left alone, both bind the address the host name resolves to, often the network's)."""
    taken = job_env_vars()
    wanted = dict(WORKER_ENV)
    interface = loopback_interface() if loopback else None
    if interface is not None:
        wanted.update({name: interface for name in SOCKET_INTERFACE_VARS if name not in os.environ})
    env = {k: v for k, v in wanted.items() if k not in taken}
    return {"env_vars": env} if env else {}


# Where Ray tells a `ray job submit` job's driver its job config (ray._private.runtime_env.constants;
# named here so that reading it does not import Ray).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# The folder name Ray gives its copy of a job's --working-dir: _ray_pkg_<hash of the folder's content>.
RAY_PACKAGE_PREFIX = "_ray_pkg_"


def _job_runtime_env() -> dict:
    """The runtime env a ``ray job submit`` job was given (empty outside a job)."""
    return json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}


def in_ray_job() -> bool:
    """Whether this process is a ``ray job submit`` job's driver."""
    return bool(os.environ.get(RAY_JOB_CONFIG_ENV))


# Set by Ray in the driver of a job submitted without entrypoint resources: it leaves the node's
# GPUs visible to that driver (ray._private.accelerators.nvidia_gpu), reserved for none of it.
NOSET_CUDA_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def job_gpus_unreserved() -> bool:
    """Whether this process is the driver of a ``ray job submit`` job that reserved no resources
    (no ``--entrypoint-num-gpus``): it sees every GPU of its node, which Ray hands to other work."""
    return in_ray_job() and os.environ.get(NOSET_CUDA_ENV, "") not in ("", "0")


def job_env_vars() -> set[str]:
    """The variables a ``ray job submit`` job's own runtime env sets (none outside a job)."""
    return set(_job_runtime_env().get("env_vars") or {})


# How long `ray job stop` waits after its SIGTERM before it SIGKILLs the driver: Ray reads this
# variable in the job's supervisor, from the cluster's environment or the job's runtime env (the
# driver's environment is a copy of the supervisor's). Ray's default is 3 s.
JOB_STOP_WAIT_ENV, JOB_STOP_WAIT_DEFAULT_S = "RAY_JOB_STOP_WAIT_TIME_S", 3


def job_stop_wait_s() -> int | None:
    """The seconds `ray job stop` leaves this driver between SIGTERM and SIGKILL; None outside a
    ``ray job submit`` job (or where Ray cannot read the value as a whole number: it then sends
    no SIGKILL)."""
    if not os.environ.get(RAY_JOB_CONFIG_ENV):
        return None
    try:
        return int(os.environ.get(JOB_STOP_WAIT_ENV, JOB_STOP_WAIT_DEFAULT_S))  # as Ray reads it
    except ValueError:
        return None


SOCKET_INTERFACE_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux), if any."""
    return interface_of("127.0.0.1")


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (IPv4 or IPv6), if any."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == address
               for a in addresses):
            return name
    return None


def working_dir_copy() -> Path | None:
    """Ray's copy of a ``ray job submit --working-dir`` folder, where the job's driver runs: a
    folder named after a hash of the folder's content, which Ray extracts anew (new path, new
    modification times) whenever the folder changed. None outside one (no job, no working dir,
    a ``local://`` one that Ray does not copy, or a remote ``s3://`` / ``https://`` zip, which Ray
    unpacks under another name: there inputs are known by their absolute path and times)."""
    if not _job_runtime_env().get("working_dir"):
        return None
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if folder.name.startswith(RAY_PACKAGE_PREFIX):
            return folder
    return None


WORKING_DIR_PREFIX = "working-dir:"


def input_identity(path: str | os.PathLike) -> str:
    """How an output records the input folder it was cut from: its absolute path, or inside a
    job's copy of its --working-dir, its path in that folder (the copy's own path changes with
    the folder's content: a resubmitted job must still resume)."""
    resolved = Path(path).resolve()
    copy = working_dir_copy()
    if copy is not None and resolved.is_relative_to(copy.resolve()):
        return f"{WORKING_DIR_PREFIX}{resolved.relative_to(copy.resolve()).as_posix()}"
    return str(resolved)


def identity_path(identity: str) -> Path | None:
    """The folder an ``input_identity`` names here: in this job's copy of its --working-dir for a
    ``working-dir:`` one (None outside such a job)."""
    if not identity.startswith(WORKING_DIR_PREFIX):
        return Path(identity)
    copy = working_dir_copy()
    return None if copy is None else copy / identity[len(WORKING_DIR_PREFIX):]


# A URL given as a path (Path("s3://b/x") is "s3:/b/x"): nothing here speaks object storage, and
# the run would write to a local folder named "s3:" instead, which no other node sees.
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def refuse_urls(**paths) -> None:
    """Refuses a URL (s3://, gs://, hdfs://, ...) where a folder is expected, each by its flag."""
    for flag, value in paths.items():
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if path is not None and URL.match(str(path)):
                scheme = str(path).split(":", 1)[0]
                raise ConfigError(
                    f"--{flag.replace('_', '-')} {path}: {scheme}:// URLs are not read or written directly; give a "
                    "folder on a file system every node mounts (NFS, a shared disk), which renames and appends "
                    "(the journal appends, every shard is renamed into place: an object-store mount such as "
                    "Mountpoint for Amazon S3 does neither)")


def check_job_paths(recorded: dict | None = None, **outputs) -> None:
    """Under ``ray job submit --working-dir``, the job's driver and workers run in Ray's temporary
    copy of that folder, which every node holds apart and Ray deletes after the job: a relative
    output would be written there. Inputs read there are fine, except ``recorded`` ones: a
    training run keeps its inputs' absolute paths for ``--resume``, and the next job's copy has
    another path (the old one gone). Refuses them, each by its flag."""
    if not _job_runtime_env().get("working_dir"):
        return
    for kind, paths in (("output", outputs), ("recorded", recorded or {})):
        for flag, value in paths.items():
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if path is None or os.path.isabs(str(path)):  # "~/out" is relative too: nothing expands it
                    continue
                where = (f"--{flag.replace('_', '-')} {path} is relative, and this job runs in Ray's temporary copy of "
                         f"its --working-dir ({os.getcwd()}), held apart on every node and deleted after the job")
                raise ConfigError(
                    f"{where}: give an absolute output path on storage every node sees" if kind == "output" else
                    f"{where}, and a run records its inputs' paths for --resume, which the next job's copy would not "
                    "have: give an absolute path on storage every node sees")


def _host_port(address: str) -> tuple[str, int | None]:
    rest = address.split("://")[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, None
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return rest, None


def _wait_until_reachable(address: str, timeout: float) -> None:
    """Fail within ``timeout`` seconds, in one line, when nothing answers at the cluster's address
    (``ray.init`` itself would wait forever)."""
    import socket

    if address in ("auto", "local"):
        return
    host, port = _host_port(address)
    if port is None:
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, timeout))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterUnreachable(
                    f"no Ray cluster answers at {address} ({exc.strerror or exc}) after {timeout:g} s; check the "
                    "address (the head's `ray start` prints it) and that the head is running"
                ) from None
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def local_cpus() -> int:
    """The CPUs a private instance declares: what this process may use, a container's CPU quota
    (Ray's cgroup rule) included, where ``os.cpu_count()`` is the host's cores (64 actors planned
    in a 2-CPU pod); at least 1 (Ray rounds a quota of 0.5 down to 0, where nothing would start)."""
    try:
        from ray._private.utils import get_num_cpus

        counted = get_num_cpus(override_docker_cpu_warning=True)
    except Exception:  # noqa: BLE001 - Ray moved it: the cores this process may run on
        counted = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, int(counted or 1))


def ray_address_file() -> str:
    """Where `ray start` records its cluster's address on this machine: under RAY_TMPDIR, else
    TMPDIR, else /tmp (Ray's own rule; a fixed /tmp/ray missed it wherever TMPDIR is set)."""
    for module in ("ray._common.utils", "ray._private.utils"):  # (where Ray 2.60, then older ones, keep it)
        try:
            return importlib.import_module(module).get_ray_address_file(None)
        except (ImportError, AttributeError, TypeError):
            continue
    if "RAY_TMPDIR" in os.environ:  # Ray's rule, by hand
        temp = os.environ["RAY_TMPDIR"]
    else:
        temp = os.environ["TMPDIR"] if sys.platform.startswith("linux") and "TMPDIR" in os.environ else "/tmp"
    return os.path.join(temp, "ray", "ray_current_cluster")


def _recorded_cluster() -> str | None:
    """The address `ray start` recorded on this machine, if any."""
    try:
        return open(ray_address_file(), encoding="utf-8").read().strip() or None
    except OSError:
        return None


def _cluster_on_this_machine() -> str | None:
    """The address `ray start` recorded here, if its cluster is still up."""
    recorded = _recorded_cluster()
    if recorded is None:
        return None
    try:
        _wait_until_reachable(recorded, 0.0)
    except ClusterUnreachable:
        return None
    return recorded


@contextlib.contextmanager
def loopback_only():
    """Within the block, Ray starts its processes on 127.0.0.1 (a private instance must not be
    reachable from the network: Ray has no authentication by default).

    Why a switch and not just ``_node_ip_address="127.0.0.1"``: on Linux Ray rewrites a loopback
    node address to the machine's interface address (``services.resolve_ip_for_localhost``) unless
    its multi-node support is off, which is exactly the switch that macOS and Windows use to keep
    a local instance on loopback."""
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    # The processes started meanwhile (GCS, raylet, and through it workers and agents) read the
    # same switch from their environment when they connect.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous[0]
        if previous[1] is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = previous[1]


@contextlib.contextmanager
def _free_agent_port():
    """Within the block, a Ray instance started here gives its dashboard agent a free port.

    Why: Ray gives every instance's agent the fixed port 52365, and ``ray.init`` has no option for
    it. A private instance holding it leaves a cluster that ``ray start --head`` starts later on
    this machine without a job agent: ``ray job submit`` then answers "No available agent" for
    ever. Where Ray's internals differ from what this expects, the default stays."""
    try:
        from ray._private.parameter import RayParams
    except ImportError:
        yield
        return
    original = RayParams.__init__
    port = _free_port()

    def with_free_port(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", port)
        original(self, *args, **kwargs)

    RayParams.__init__ = with_free_port
    try:
        yield
    finally:
        RayParams.__init__ = original


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
