"""Preprocessing's real path on a Ray cluster, proven on this machine: a head and two nodes on
loopback (``loopback_cluster``), a job submitted with ``ray job submit``'s API that loses a worker
node mid-run, the driver killed mid-run; and how the CLI connects: a private local instance on
loopback only, an unreachable address in one line, a job's runtime env merged, one run per
output folder."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from disco.pipeline.demo_data import pan_zoom_frames, write_video
from disco.pipeline.errors import ConfigError
from disco.pipeline.store.reader import open_triplets
from disco.pipeline.store.schema import TRIPLET_SCHEMA
from disco.pipeline.store.output import OutputStore
from helpers import cli_process, lock_held_elsewhere, save, submit_job
from loopback_cluster import loopback_cluster

OPTIONS = ["--segment-frames", "6", "--shard-rows", "6", "--max-side", "128", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two clips cut into 10 units of 6 frames: enough units to interrupt between commits."""
    folder = tmp_path_factory.mktemp("cluster-in")
    write_video(folder / "dance.mp4", pan_zoom_frames(data.astronaut(), 42, 128), 30.0)
    write_video(folder / "mirror.mp4", pan_zoom_frames(data.astronaut()[:, ::-1], 18, 112), 30.0)
    return folder


def _command(inputs: Path, out: Path, *extra: str) -> tuple[list[str], dict]:
    return cli_process("preprocess", "--source", "video", "--input", str(inputs), "--output", str(out),
                       *OPTIONS, *extra)


def _start(inputs: Path, out: Path, *extra: str) -> subprocess.Popen:
    command, env = _command(inputs, out, *extra)
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_commits(out: Path, process: subprocess.Popen, count: int, timeout: float = 240) -> None:
    journal = out / "_journal.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if journal.exists() and journal.read_text().count('"commit"') >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {count} commit(s): {process.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {count} commit(s) within {timeout} s")


@contextmanager
def _reaped(process: subprocess.Popen):
    """A run started beside other work: whatever fails meanwhile, it does not outlive the test."""
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _same_rows(got: Path, want: Path) -> None:
    a = open_triplets(got).to_table().sort_by("sample_id")
    b = open_triplets(want).to_table().sort_by("sample_id")
    assert a.num_rows == b.num_rows > 0
    ids = a.column("sample_id").to_pylist()
    assert len(set(ids)) == len(ids), "a row was written twice"
    for name in TRIPLET_SCHEMA.names:
        assert a.column(name).equals(b.column(name)), name
    # Nothing uncommitted is left behind in the folders either.
    named = {n for e in OutputStore(got).read_journal().entries for n in e["files"]}
    on_disk = {p.relative_to(got).as_posix() for p in got.rglob("*.parquet")}
    assert on_disk == named


def test_on_a_cluster_a_lost_node_a_killed_driver_and_a_job_all_give_the_rows_of_a_local_run(inputs, tmp_path):
    """One loopback cluster (a head with its dashboard and two worker nodes) for all three runs:
    cluster start-up is the slow part."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    with loopback_cluster(head_cpus=1, dashboard=True, keep_current=True) as cluster, ExitStack() as runs:
        # One CPU a node: three actors, one on each, start sooner on two cores than five.
        doomed = cluster.add_node(1)
        cluster.add_node(1)

        # 1. Without --ray-address on a machine that runs a cluster: a private instance, said so.
        # It runs while the job below does (the two wait on process start-ups in turn), and its
        # rows are the uninterrupted ones the other runs must give.
        local = tmp_path / "local"
        private = runs.enter_context(_reaped(_start(inputs, local)))

        # 2. `ray job submit`: the dashboard's job API runs disco-cli on the cluster, with a runtime
        # env that sets a variable of our own worker settings (merged, not conflicting). A worker
        # node is lost mid-run, with no replacement: Ray Data runs the lost work again on the nodes
        # that are left; nothing is missing or written twice.
        job_out = tmp_path / "job"
        client = JobSubmissionClient(cluster.dashboard)
        cli = Path(sys.executable).with_name("disco-cli")
        entrypoint = " ".join([str(cli), "preprocess", "--source", "video", "--input", str(inputs), "--output",
                               str(job_out), *OPTIONS[:-1]])
        job = submit_job(client, entrypoint, {"OMP_NUM_THREADS": "2"})
        ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.time() + 240
        journal = job_out / "_journal.jsonl"
        while not (journal.exists() and journal.read_text().count('"commit"') >= 1):
            assert client.get_job_status(job) not in ended, client.get_job_logs(job)[-3000:]
            assert time.time() < deadline, "the job committed nothing in time"
            time.sleep(0.05)
        cluster.kill_node(doomed)
        assert journal.read_text().count('"commit"') < 10, "the kill came after the work"
        deadline = time.time() + 300
        while client.get_job_status(job) not in ended:
            assert time.time() < deadline, "the job did not end in time"
            time.sleep(1)
        code, output = _finish(private)
        assert code == 0, output[-3000:]
        assert "this machine runs a Ray cluster" in output and "--ray-address auto" in output
        manifest = json.loads((local / "manifest.json").read_text())
        assert manifest["run"]["ray_address"] == "local"
        assert manifest["counts"]["rows_written"] == 60
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
        assert "progress: 2/2 inputs" in logs and "preprocess summary" in logs and "Traceback" not in logs
        _same_rows(job_out, local)
        run = json.loads((job_out / "manifest.json").read_text())["run"]
        assert run["ray_address"] != "local"
        assert run["pools"][0]["actors"] == 3  # one per CPU of the three nodes it saw at the start

        # 3. The driver killed mid-run: the same command finishes the rest.
        killed = tmp_path / "killed-driver"
        process = _start(inputs, killed, "--ray-address", cluster.address)
        _wait_for_commits(killed, process, 1)
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        # Again with `auto`, as on the head node: the cluster `ray start` recorded (Ray's own
        # resolution dialled the interface address, where this loopback cluster does not answer).
        command, env = _command(inputs, killed, "--ray-address", "auto")
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resuming" in again.stderr + again.stdout
        _same_rows(killed, local)


def test_device_cuda_on_a_cluster_with_no_gpu_yet_waits_for_the_nodes_an_autoscaler_adds(tmp_path, monkeypatch,
                                                                                          ray_local):
    """A cluster whose GPU nodes are scaled to zero (an autoscaler adds them on demand): `--device
    cuda --actors N` is not refused; its actors' GPU requests wait, and the run goes through once
    a node with GPUs joins (added here, as the autoscaler would). Without --actors it says to pass it."""
    import ray

    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.run import preprocess

    folder = tmp_path / "in"
    photo = Image.fromarray(data.astronaut()).resize((64, 64))
    for k in range(3):
        save(folder / f"p{k}.png", photo.rotate(5 * k))
    out = tmp_path / "out"
    # The refusal, in this process: with an address (here the session's instance, already joined),
    # the GPUs counted are the cluster's, and it shows none.
    address = ray.get_runtime_context().gcs_address
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match="the cluster has no GPU now; .* pass --actors N too"):
        preprocess(PreprocessConfig(source="images", input=folder, output=out, matting="mediapipe", device="cuda",
                                    ray_address=address), log=lambda *_: None)
    assert not out.exists()
    # `auto` there takes the CPU backends for the whole data set: said, with the way to the GPUs.
    said = []
    preprocess(PreprocessConfig(source="images", input=folder, output=tmp_path / "auto", pose="none", hands=False,
                                ray_address=address), log=said.append)
    assert any(line.startswith("the cluster has no GPU now, so this run uses CPU backends") and
               "--device cuda --actors N" in line for line in said), said
    monkeypatch.undo()
    with loopback_cluster(head_cpus=1) as cluster:
        command, env = cli_process("preprocess", "--source", "images", "--input", str(folder), "--output", str(out),
                                   "--matting", "centre-box-gpu", "--pose", "none", "--device", "cuda", "--actors", "1",
                                   "--no-progress", "--ray-address", cluster.address)
        # The make-believe GPU backend's declaration, in the command's process (and its actors').
        command[1:3] = ["-c", "import sys, gpu_plugin, disco.cli; sys.argv[0] = 'disco-cli'; disco.cli.main()"]
        with _reaped(subprocess.Popen(command, env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) as run:
            said = []
            for line in run.stdout:
                said.append(line)
                if "no GPU in the cluster now" in line:
                    break
            assert said and "no GPU in the cluster now" in said[-1], "".join(said)[-3000:]
            time.sleep(1)  # the run waits for its GPU actors ...
            assert run.poll() is None and not list(out.rglob("*.parquet")), "".join(said)[-3000:]
            cluster.add_node(1, gpus=1)  # ... which start on the node that joins
            code, output = _finish(run, timeout=240)
        assert code == 0, ("".join(said) + output)[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rows_written"] == 3
    assert manifest["backends"]["device"] == "cuda"
    held = manifest["run"]["stage_resources"]["matting"]
    assert held and all(actor["GPU"] == 0.5 and len(actor["gpu_ids"]) == 1 for actor in held), held


def test_an_unreachable_cluster_fails_in_one_line_within_the_stated_time(inputs, tmp_path):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command, env = _command(inputs, tmp_path / "out", "--ray-address", f"127.0.0.1:{port}")
    started = time.time()
    result = subprocess.run(command, env={**env, "DISCO_RAY_TIMEOUT": "3"}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in lines[0], result.stderr
    assert "after 3 s" in lines[0] and "Traceback" not in result.stderr
    assert time.time() - started < 60


def test_a_resume_on_a_cluster_made_anew_names_the_saved_address(triplets, tmp_path):
    """A run keeps the --ray-address it started on (config.yaml), and a --resume given none takes
    it: the head of a cluster made anew (preemptible nodes) has another. The one line says where
    the address came from and what to pass."""
    import socket

    with socket.socket() as sock:  # a head that is gone: nothing listens on its port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "run"
    command, env = cli_process("train", "--data", str(triplets["video"]), "--model", "tiny", "--stage", "finetune",
                               "--max-steps", "2", "--output", str(run))
    env = {**env, "DISCO_RAY_TIMEOUT": "1"}
    first = subprocess.run(command + ["--ray-address", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True,
                           timeout=180)
    assert first.returncode == 2 and f"no Ray cluster answers at 127.0.0.1:{port}" in first.stderr, first.stderr
    assert "started on" not in first.stderr  # given, not saved: nothing more to say
    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert resumed.returncode == 2 and len(lines) == 1 and "Traceback" not in resumed.stderr, resumed.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in lines[0] and "the address the run was started on" in lines[0]
    assert "pass --ray-address for the cluster it resumes on" in lines[0]


def test_a_driver_on_a_machine_outside_the_cluster_is_told_at_once_in_one_line(inputs, tmp_path, ray_local):
    """A cluster that answers, from a machine that runs none of its nodes (a login node, a
    laptop: here, this session's instance with Ray's search for a local raylet finding none):
    ray.init would look for one for a minute, then raise a traceback. The command says why in
    one line and what to do instead, and exits 2, at once."""
    import ray

    address = ray.get_runtime_context().gcs_address
    command, env = _command(inputs, tmp_path / "out", "--ray-address", address)
    command[1:3] = ["-c", "import ray._private.services as s; s.find_node_ids = lambda: []; "
                          "import disco.cli; disco.cli.main()"]
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"--ray-address {address}: no node of that Ray cluster runs on this machine" in lines[0]
    assert "ray job submit" in lines[0]
    assert time.time() - started < 40
    assert not (tmp_path / "out" / "_journal.jsonl").exists()


def test_our_worker_settings_yield_to_a_jobs_runtime_env(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from disco.pipeline.cluster import WORKER_ENV, _runtime_env

    assert _runtime_env() == {"env_vars": WORKER_ENV}
    job = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "8"}, "working_dir": "."}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    merged = _runtime_env()["env_vars"]
    assert "OMP_NUM_THREADS" not in merged and merged["GLOG_minloglevel"] == WORKER_ENV["GLOG_minloglevel"]
    # A training worker's threads follow its CPUs, unless the job set OMP_NUM_THREADS itself.
    from disco.train.launch import worker_threads

    assert worker_threads(2.0) is None
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR)
    assert (worker_threads(2.0), worker_threads(0.5), worker_threads(4.0)) == (2, 1, 4)


def test_a_bad_timeout_and_a_shard_that_is_not_on_shared_storage_are_one_line_errors(tmp_path, monkeypatch):
    from disco.pipeline.errors import ConfigError
    from disco.pipeline.cluster import _connect_timeout
    from disco.pipeline.run import _check_shards

    monkeypatch.setenv("DISCO_RAY_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="DISCO_RAY_TIMEOUT='soon'"):
        _connect_timeout()
    monkeypatch.setenv("DISCO_RAY_TIMEOUT", "2.5")
    assert _connect_timeout() == 2.5
    # A commit record from an actor whose shard landed on another node's disk.
    store = OutputStore(tmp_path / "out")
    store.prepare()
    entry = {"shards": [{"path": "triplets/part-x-00000.parquet", "rows": 3, "bytes": 1234}]}
    with pytest.raises(ConfigError, match="is missing here: .* storage every node sees"):
        _check_shards(store, entry)
    (store.triplets / "part-x-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="holds 4 bytes, not the 1234 written"):
        _check_shards(store, entry)


def test_the_private_local_instance_listens_on_loopback_only(ray_local):
    """Every listening socket of the Ray processes this test session started (GCS, raylet, object
    manager, workers, agents) is bound to 127.0.0.1: nothing of it is reachable from the network."""
    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    import ray

    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    assert gcs_port in {c.laddr.port for c in listening} and len(listening) >= 3, "these are not Ray's sockets"
    # Not the fixed port of Ray's job agent either: a `ray start --head` on this machine needs it.
    assert 52365 not in {c.laddr.port for c in listening}
    for conn in listening:
        ip = ipaddress.ip_address(conn.laddr.ip)
        ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
        assert ip.is_loopback, f"a Ray process (pid {conn.pid}) listens on {conn.laddr.ip}:{conn.laddr.port}"
    # The training workers' gloo / NCCL sockets too: left alone they bind the address the host
    # name resolves to, which on many machines is the network's.
    interfaces = ray.get(ray.remote(num_cpus=0)(
        lambda: {name: os.environ.get(name) for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}).remote())
    addresses = psutil.net_if_addrs()
    for name, interface in interfaces.items():
        assert interface in addresses, f"{name}={interface!r} in a Ray worker"
        assert "127.0.0.1" in {a.address for a in addresses[interface]}


def test_a_private_instance_counts_the_cpus_a_container_grants_not_the_hosts():
    """In a pod limited to part of a CPU on a host of many, the private instance took the host's
    cores (``os.cpu_count()``), and preprocessing planned an actor per host core on a part of one
    CPU's time. It declares what the quota grants, at least 1 (Ray rounds 0.5 down to 0, where
    nothing would start). The container is played by Ray's own quota reader saying 0.5 on this
    2-core machine."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs a machine of 2 cores or more")
    script = ("import ray._private.utils as utils\n"
              "utils._get_docker_cpus = lambda *a, **k: 0.5\n"
              "from disco.pipeline.cluster import init_ray\n"
              "init_ray(None)\n"
              "import ray\n"
              "print('cpus', ray.cluster_resources().get('CPU'))\n"
              "ray.shutdown()\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RAY_ADDRESS": ""},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cpus 1.0" in done.stdout.splitlines(), done.stdout


def test_the_cluster_that_ray_start_recorded_is_found_under_tmpdir(tmp_path, monkeypatch):
    """``ray start`` records its address under $TMPDIR/ray when TMPDIR is set (Ray's rule on
    Linux): read from a fixed /tmp/ray, the "this machine runs a Ray cluster ... --ray-address
    auto" hint never came."""
    import socket

    from disco.pipeline import cluster

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert cluster.ray_address_file() == str(tmp_path / "ray" / "ray_current_cluster")
    with socket.socket() as listener:  # a GCS that answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
        assert cluster._cluster_on_this_machine() == address
    assert cluster._cluster_on_this_machine() is None  # no longer up


def test_ray_address_auto_is_the_cluster_ray_start_recorded_or_one_line(tmp_path, monkeypatch):
    """``--ray-address auto`` joins RAY_ADDRESS, else the cluster ``ray start`` recorded here while
    it is up, by the address recorded (the loopback checks need it; Ray turned 127.0.0.1 into the
    interface address and waited there for ever); with none, one line, not another command's
    private instance that Ray would find running."""
    import socket

    from disco.pipeline import cluster

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert cluster._resolve_auto("10.0.0.5:6379") == "10.0.0.5:6379"
    with pytest.raises(cluster.ClusterUnreachable, match=r"--ray-address auto: no cluster recorded by `ray start` "
                                                         r"on this machine \("):
        cluster._resolve_auto("auto")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # the job CLI's, exported: refused in one line
    with pytest.raises(ConfigError, match="is a Ray dashboard's address"):
        cluster._resolve_auto("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    with socket.socket() as listener:  # a GCS that answers, recorded as `ray start` does
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")
        assert cluster._resolve_auto("auto") == address
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a job's driver: its cluster
        assert cluster._resolve_auto("auto") == "10.0.0.5:6379"


def test_a_loopback_address_is_a_loopback_cluster_only_when_every_node_is_on_loopback(ray_local, monkeypatch):
    """The head node of a real cluster answers at localhost too: joined that way, the driver and
    the training workers' gloo / NCCL sockets must not be kept on loopback, where the other nodes
    cannot reach them. The GCS's node table decides, not the address typed. (Joining a cluster off
    loopback cannot run here: the node table of one is stood in for.)"""
    from types import SimpleNamespace

    import ray
    from ray import _raylet

    from disco.pipeline.cluster import _cluster_nodes, _on_loopback

    def on_loopback(address: str) -> bool:  # as init_ray asks
        return _on_loopback(address, _cluster_nodes(address))

    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:") and on_loopback(address)
    assert on_loopback(address.replace("127.0.0.1", "localhost"))
    real = _raylet.GcsClient

    class RealCluster:  # this instance's node table, plus a node on the network
        def __init__(self, address):
            self.client = real(address=address)

        def get_all_node_info(self, timeout=None):
            nodes = dict(self.client.get_all_node_info(timeout=timeout))
            return {**nodes, b"other": SimpleNamespace(node_manager_address="10.1.2.3")}

    monkeypatch.setattr(_raylet, "GcsClient", RealCluster)
    assert not on_loopback(address)


def test_one_run_per_output_folder_and_a_killed_runs_lock_is_no_lock(tmp_path, monkeypatch):
    store = OutputStore(tmp_path / "out")
    with lock_held_elsewhere(store.root) as holder:
        with pytest.raises(Exception, match=rf"being written by another run \(pid {holder.pid} on "):
            with store.locked():
                pass
    with store.locked():  # the killed holder's lock died with it
        pass
    # A file system without locks (Lustre mounted without flock): the run goes on, and says so.
    import errno
    import fcntl
    from types import SimpleNamespace

    from disco.pipeline.store import output

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output, "fcntl", SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    with pytest.warns(UserWarning, match=r"out is on a file system that takes no locks \(No locks available\)"):
        with store.locked():
            assert (store.root / output.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    # Locks that hold on one node only (NFS mounted with local_lock): a second run on another node
    # gets the lock too, and writes its name into the file. The first one's next commit stops it, in
    # one line, with nothing appended: from there on its commits would duplicate the other's work.
    monkeypatch.setattr(output, "fcntl", SimpleNamespace(flock=lambda fd, operation: None, LOCK_EX=fcntl.LOCK_EX,
                                                         LOCK_NB=fcntl.LOCK_NB))
    commit = {"type": "commit", "files": [], "shards": [], "units": []}
    with store.locked():
        store.begin({"p": 1})
        store.append(commit)
        journal = store.journal.read_bytes()
        other = OutputStore(store.root)
        with other.locked():  # the second run, as if on another node
            with pytest.raises(output.OutputTaken, match=r"was taken by another run \(pid .* local_lock\); this run stops"):
                store.append(commit)
            with pytest.raises(output.OutputTaken):  # nor does it clear the other run's uncommitted shards
                store.recover(store.read_journal())
            assert store.journal.read_bytes() == journal
            other.append(commit)  # the run that took it goes on


def test_under_a_job_with_a_working_dir_a_relative_output_is_refused(tmp_path, monkeypatch):
    """``ray job submit --working-dir .`` runs the job in Ray's temporary copy of that folder,
    apart on every node and deleted after the job: a relative --output would be written there.
    Refused in one line (exit 2) by both commands; an absolute one, or no working_dir, passes."""
    import json as json_

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from typer.testing import CliRunner

    from disco.cli import app
    from disco.pipeline.cluster import check_job_paths
    from disco.pipeline.errors import ConfigError

    check_job_paths(output="out")  # not a job: anything goes
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json_.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    monkeypatch.chdir(tmp_path)
    check_job_paths(output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="--output out is relative"):
        check_job_paths(output="out")
    (tmp_path / "in").mkdir()
    for command in (["preprocess", "--source", "images", "--input", "in", "--output", "out"],
                    ["train", "--data", "in", "--model", "tiny", "--output", "run"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "is relative, and this job runs in Ray's temporary copy" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    # A training run records its inputs' absolute paths for --resume: there, the copy's would be
    # gone by the next job (and another path if the folder changed). Preprocess reads them alone.
    check_job_paths({"data": [str(tmp_path / "in")], "pretrained": None}, output=str(tmp_path / "run"))
    for flag in ("--data", "--pretrained", "--init-from"):
        args = {"--data": ["--data", str(tmp_path / "in")], "--output": ["--output", str(tmp_path / "run")], flag: [flag, "in"]}
        result = CliRunner().invoke(app, ["train", "--model", "tiny", *[a for pair in args.values() for a in pair]])
        assert result.exit_code == 2 and f"{flag} in is relative" in result.output, result.output
        assert "records its inputs' paths for --resume" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # generate, export and evaluate write files too (evaluate's default --output is relative):
    # refused before any model loads. Their --device auto on a driver that sees no GPU says so.
    for command, flag in ((["generate", "--checkpoint", "ck", "--reference", "r.png", "--pose", "p.mp4", "-o", "o.mp4"], "--output"),
                          (["generate", "--checkpoint", "ck", "--reference", "r.png", "--pose", "p.mp4",
                            "-o", str(tmp_path / "o.mp4"), "--frames", "frames"], "--frames"),
                          (["export", "--checkpoint", "ck", "-o", "unets"], "--output"),
                          (["demo"], "--output"),  # its default, before its inputs are written into the copy
                          (["evaluate", "--pred", "p", "--gt", "g"], "--output"),
                          (["evaluate", "--run", "ck", "--data", "d", "-o", str(tmp_path / "m.json"), "--work-dir", "w"], "--work-dir")):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and f"{flag} " in result.output and "is relative" in result.output, result.output
    assert not (tmp_path / "demo-output").exists()
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a head node without a GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(tmp_path / "ck"), "--reference", str(tmp_path / "r.png"),
                                      "--pose", str(tmp_path / "p.mp4"), "-o", str(tmp_path / "o.mp4")])
    assert result.output.startswith("this job's driver sees no GPU, so it runs on the CPU") and result.exit_code == 2
    assert "--entrypoint-num-gpus 1" in result.output
    # Submitted with --entrypoint-num-gpus 1, Ray set the driver's device, which PyTorch cannot use:
    # the advice to submit with that flag was wrong.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(tmp_path / "ck"), "--reference", str(tmp_path / "r.png"),
                                      "--pose", str(tmp_path / "p.mp4"), "-o", str(tmp_path / "o.mp4")])
    assert result.output.startswith("this job's driver has GPU 3 (CUDA_VISIBLE_DEVICES), and PyTorch here finds "
                                    ) and result.exit_code == 2, result.output
    assert "so it runs on the CPU" in result.output and "submitted with --entrypoint-num-gpus 1" not in result.output
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    # A job submitted without entrypoint resources: Ray shows its driver every GPU of the node
    # (and says so in the driver's environment), reserving none; one line says what to submit with.
    from disco.pipeline.cluster import NOSET_CUDA_ENV

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    unreserved = ["generate", "--checkpoint", str(tmp_path / "ck"), "--reference", str(tmp_path / "r.png"),
                  "--pose", str(tmp_path / "p.mp4"), "-o", str(tmp_path / "o.mp4")]
    result = CliRunner().invoke(app, unreserved)
    assert result.exit_code == 2 and "did not reserve" not in result.output  # reserved: Ray set the devices
    monkeypatch.setenv(NOSET_CUDA_ENV, "1")
    result = CliRunner().invoke(app, unreserved)
    said = " ".join(result.output.split())
    assert said.startswith("this job's driver runs on cuda, a GPU Ray did not reserve for it") and result.exit_code == 2
    assert "--entrypoint-num-gpus N" in said
    monkeypatch.delenv(NOSET_CUDA_ENV)
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR)
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(tmp_path / "ck"), "--reference", str(tmp_path / "r.png"),
                                      "--pose", str(tmp_path / "p.mp4"), "-o", "o.mp4"])
    assert result.exit_code == 2 and "sees no GPU" not in result.output and "is relative" not in result.output


def test_a_resubmitted_job_resumes_from_a_new_copy_of_its_working_dir(tmp_path, monkeypatch, ray_local):
    """`ray job submit --working-dir` with relative inputs: Ray runs the job in a copy of the
    folder named after a hash of its content, extracted anew (a new path, every file with a new
    modification time) whenever the folder changed. A job resubmitted after a video was added goes
    on: the output knows its input by its path in the folder and the videos by their content, so
    the partly done one is finished and the new one cut; a video whose content changed (same
    size) is still said."""
    import json as json_
    import shutil

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from disco.pipeline.config import PreprocessConfig
    from disco.pipeline.run import preprocess

    copies = tmp_path / "session" / "runtime_resources" / "working_dir_files"
    first_copy = copies / "_ray_pkg_0a1b"
    write_video(first_copy / "videos" / "dance.mp4", pan_zoom_frames(data.astronaut(), 12, 96), 30.0)
    write_video(first_copy / "videos" / "mirror.mp4", pan_zoom_frames(data.astronaut()[:, ::-1], 4, 96), 30.0)
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json_.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0a1b.zip"}}))
    monkeypatch.chdir(first_copy)
    out = tmp_path / "out"

    def run(lines=None, folder="videos"):
        return preprocess(PreprocessConfig(source="video", input=Path(folder), output=out, segment_frames=4,
                                           max_side=96), log=lines.append if lines is not None else lambda *_: None)

    first = run()
    assert first.manifest["counts"]["rows_written"] == 16
    # The job was killed before its last commit (dance.mp4's third unit): drop that commit.
    journal = out / "_journal.jsonl"
    records = [json_.loads(line) for line in journal.read_text().splitlines()]
    assert records[0]["params"]["input"] == "working-dir:videos"
    assert first.manifest["parameters"]["input"] == "working-dir:videos"  # not "videos", in a copy since deleted
    last = max(u["unit_index"] for r in records for u in r.get("units", []) if u["input_path"] == "dance.mp4")
    journal.write_text("".join(json_.dumps(r) + "\n" for r in records
                               if not any((u["input_path"], u["unit_index"]) == ("dance.mp4", last)
                                          for u in r.get("units", []))))
    # A video added to the folder, the job resubmitted: Ray's new copy, files as its unzip writes them.
    second_copy = copies / "_ray_pkg_9f8e"
    shutil.copytree(first_copy, second_copy, copy_function=shutil.copyfile)
    write_video(second_copy / "videos" / "new.mp4", pan_zoom_frames(data.astronaut(), 4, 96), 30.0)
    monkeypatch.chdir(second_copy / "videos")  # the entrypoint may change directory inside the copy
    lines: list[str] = []
    again = run(lines, folder=".")
    assert "changed_inputs" not in again.manifest, lines
    assert again.manifest["counts"]["rows_written"] == 20 and again.manifest["run"]["inputs_processed"] == 2
    # A video whose content changed, at the same size, is still one.
    mirror = second_copy / "videos" / "mirror.mp4"
    content = bytearray(mirror.read_bytes())
    content[-100] ^= 0xFF
    mirror.write_bytes(bytes(content))
    assert run(folder=".").manifest["changed_inputs"] == ["mirror.mp4"]


def test_an_object_store_url_for_a_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    """`--output s3://bucket/out` became a local folder named `s3:` (Path collapses the slashes),
    written on the driver's machine alone; a URL for the input, the data or the weights was read
    as a missing folder. Each is refused by its flag, in one line, before anything runs."""
    from typer.testing import CliRunner

    from disco.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    for command, flag in ((["preprocess", "--source", "images", "--input", "in", "--output", "s3://bucket/out"], "output"),
                          (["preprocess", "--source", "images", "--input", "gs://bucket/in", "--output", "out"], "input"),
                          (["train", "--data", "hdfs://name/data", "--model", "tiny", "--output", "run"], "data"),
                          (["train", "--data", "in", "--model", "tiny", "--output", "s3://bucket/run"], "output")):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and f"--{flag} " in lines[0] and "URLs are not read or written directly" in lines[0], lines
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "out").exists()


def test_a_dashboard_or_ray_client_address_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch,
                                                                                             ray_local):
    """The dashboard's http://HEAD:8265, which Ray's docs have users export as RAY_ADDRESS for
    `ray job submit`, was a ValueError traceback from ray.init, after a run's config.yaml recorded
    it (every --resume then went back to it). A Ray Client ray://localhost:10001 (a port-forward)
    was taken for a cluster on this machine's loopback: the training workers' gloo and NCCL
    sockets were kept on `lo` on every node, and the driver wrote the run's files off the cluster.
    Both are refused by preprocess, filter-humans and train, from the flag or the environment."""
    from typer.testing import CliRunner

    from disco.cli import app
    from disco.pipeline.cluster import init_ray

    monkeypatch.chdir(tmp_path)
    save(tmp_path / "in" / "a.png", Image.fromarray(data.astronaut()))
    (tmp_path / "data" / "triplets").mkdir(parents=True)
    commands = (["preprocess", "--source", "images", "--input", "in", "--output", "out"],
                ["filter-humans", "--source", "images", "--input", "in", "--output", "out"],
                ["train", "--data", "data", "--model", "tiny", "--output", "run"])
    for address, said in (("http://127.0.0.1:8265", "is a Ray dashboard's address"),
                          ("ray://localhost:10001", "Ray Client is not supported")):
        for command in commands:
            for env, flag in (({"RAY_ADDRESS": address}, []), ({}, ["--ray-address", address])):
                result = CliRunner().invoke(app, command + flag, env=env)
                lines = result.output.strip().splitlines()
                assert result.exit_code == 2 and len(lines) == 1, result.output
                assert f"--ray-address / RAY_ADDRESS {address}" in lines[0] and said in lines[0], lines
        with pytest.raises(ConfigError, match=said):  # and where only the environment names it, Ray started or not
            monkeypatch.setenv("RAY_ADDRESS", address)
            init_ray()
        monkeypatch.delenv("RAY_ADDRESS")
    assert "ray job submit --address http://127.0.0.1:8265 -- disco-cli" in CliRunner().invoke(
        app, commands[0] + ["--ray-address", "http://127.0.0.1:8265"]).output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]


def test_filter_humans_on_triplets_resumes_from_a_new_copy_of_a_jobs_working_dir(triplets, tmp_path, monkeypatch):
    """filter-humans on a triplets folder recorded its input by its absolute path, which under
    `ray job submit --working-dir` is inside Ray's copy of the folder: a resubmitted job (a new
    copy, another path) was refused as "written with different options"."""
    import shutil

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from disco.pipeline.filter import filter_triplets

    copies = tmp_path / "session" / "runtime_resources" / "working_dir_files"
    shutil.copytree(triplets["images"], copies / "_ray_pkg_0a1b" / "stills")
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0a1b.zip"}}))
    out = tmp_path / "filtered"
    options = dict(min_score=0.0, min_area=0.0, max_persons=None, keep_rejects=False, log=lambda *_: None)
    for copy in ("_ray_pkg_0a1b", "_ray_pkg_9f8e"):
        if not (copies / copy).exists():
            shutil.copytree(copies / "_ray_pkg_0a1b", copies / copy)
        monkeypatch.chdir(copies / copy)
        result = filter_triplets(Path("stills"), out, **options)
        assert result.manifest["counts"]["rows_written"] == 2
    journal = [json.loads(line) for line in (out / "_journal.jsonl").read_text().splitlines()]
    assert journal[0]["params"]["input"] == "working-dir:stills"
    # A reader of the output while it is still written (no manifest yet) finds its source there.
    from disco.pipeline.store.pose import data_pose

    (out / "manifest.json").unlink()
    assert data_pose(out).max_side == data_pose(Path("stills")).max_side == 96


def test_the_gpu_pipelines_decoding_actor_reads_a_videos_segments_from_one_reader(tmp_path, monkeypatch):
    """The GPU pipeline's matting actors take calls of consecutive units and keep the video they
    read last open: one video's twelve segments are decoded from one reader (each unit opened it
    anew before, seeking back to its keyframe), and every unit's rows arrive, one unit at a time
    out of the matting actor."""
    folder = tmp_path / "in"
    write_video(folder / "dance.mp4", pan_zoom_frames(data.astronaut(), 96, 64), 30.0)
    opens = tmp_path / "opens.log"
    opens.touch()
    monkeypatch.setenv("DISCO_TEST_VIDEO_OPENS", str(opens))
    out = tmp_path / "out"
    with loopback_cluster(head_cpus=1) as cluster:
        cluster.add_node(2, gpus=1)
        command, env = cli_process("preprocess", "--source", "video", "--input", str(folder), "--output", str(out),
                                   "--matting", "centre-box-gpu", "--pose", "none", "--device", "cuda", "--actors", "1",
                                   "--segment-frames", "8", "--no-progress", "--ray-address", cluster.address)
        command[1:3] = ["-c", "import sys, gpu_plugin, disco.cli; sys.argv[0] = 'disco-cli'; disco.cli.main()"]
        with _reaped(subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)) as run:
            code, output = _finish(run, timeout=240)
    assert code == 0, output[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    pools = {p["stage"]: p for p in manifest["run"]["pools"]}
    assert pools["matting"]["actors"] == 1 and pools["matting"]["units_per_call"] == 3  # 12 units, 4 calls
    assert manifest["counts"]["rows_written"] == 96
    assert sorted(open_triplets(out).to_table(columns=["frame_index"]).column("frame_index").to_pylist()) == list(range(96))
    opened = opens.read_text().splitlines()
    assert len(opened) == 1 and opened[0].endswith(" dance.mp4"), opened


_GLOO_DRIVER = r"""
import json, sys, tempfile
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from disco.pipeline.cluster import loopback_only
from disco.train.process_group import WorkerTorchConfig


def work(config):
    import os, torch, torch.distributed as dist

    ones = torch.ones(1)
    dist.all_reduce(ones)  # the group works
    with open(os.path.join(config["folder"], f"{dist.get_rank()}.json"), "w") as out:
        json.dump({"interface": os.environ.get("GLOO_SOCKET_IFNAME"), "world": dist.get_world_size(),
                   "sum": float(ones)}, out)


with loopback_only():  # as disco's drivers join a cluster on loopback, less the worker settings
    ray.init(address=sys.argv[1], logging_level="ERROR")
TorchTrainer(work, train_loop_config={"folder": sys.argv[2]}, torch_config=WorkerTorchConfig(backend="gloo"),
             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.1}),
             run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="gloo")).fit()
"""


def test_training_workers_bind_gloo_to_the_interface_of_their_nodes_address(ray_local, tmp_path):
    """Before Ray Train starts the process group, every worker sets GLOO_SOCKET_IFNAME to the
    interface that holds its node's Ray address (left alone, gloo binds what the host name
    resolves to: 127.0.1.1 on many Linux images, which no other node reaches). A value the user
    set stays."""
    import ray

    from disco.pipeline.cluster import interface_of, loopback_interface
    from disco.train.process_group import bind_gloo_to_node_address

    @ray.remote(num_cpus=0)
    def bind(preset):
        import os

        before = os.environ.pop("GLOO_SOCKET_IFNAME", None)
        try:  # (the session's workers are reused: their environment is left as it was)
            if preset:
                os.environ["GLOO_SOCKET_IFNAME"] = preset
            return bind_gloo_to_node_address(), os.environ.get("GLOO_SOCKET_IFNAME"), ray.util.get_node_ip_address()
        finally:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
            if before is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = before

    interface, env, node_ip = ray.get(bind.remote(None))
    assert node_ip == "127.0.0.1" and interface == env == loopback_interface() is not None
    assert ray.get(bind.remote("eth-chosen"))[:2] == ("eth-chosen", "eth-chosen")
    assert interface_of("198.51.100.77") is None  # TEST-NET-2: on no interface here

    # Through Ray Train's own start of a gloo group, in a job whose workers had no such variable.
    env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.run([sys.executable, "-c", _GLOO_DRIVER, address, str(tmp_path)], env={**env, "RAY_ADDRESS": ""},
                            capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert ranks == [{"interface": loopback_interface(), "world": 2, "sum": 2.0}] * 2


def test_a_sigterm_as_a_finished_command_exits_leaves_no_traceback(tmp_path):
    """`ray job stop` reaching a job as its command ends (the summary said): Ray's SIGTERM handler
    (sys.exit) ran inside Ray's own shutdown at exit, printing a traceback after the summary. A
    finished command now lets it pass."""
    script = tmp_path / "finished.py"
    script.write_text(
        "import atexit, os, signal, sys\n"
        "from disco import cli\n"
        "from disco.pipeline.cluster import init_ray\n"
        "init_ray(num_cpus=1)\n"  # Ray's SIGTERM handler, and its shutdown at exit
        "cli.app = lambda **kwargs: sys.exit(0)\n"  # a command whose work is done
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"  # before Ray's shutdown (LIFO)
        "cli.main()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0 and "Traceback" not in done.stderr and "SystemExit" not in done.stderr, done.stderr[-2000:]
