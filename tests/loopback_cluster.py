"""A multi-node Ray cluster on this machine, on loopback only, run in a process of its own.

``ray start`` cannot keep a node on 127.0.0.1 on Linux (it rewrites a loopback address to the
interface address), so the nodes come from Ray's own ``ray.cluster_utils.Cluster`` with
``node_ip_address="127.0.0.1"``, in a child process that owns every Ray process of the cluster
(one process group: the test stops it by that PID, never with ``ray stop``). The test sends
commands on its stdin, one per line, and reads one line back per command:

    add CPUS [GPUS] -> node N        (a new worker node with CPUS CPUs, and GPUS fake GPUs)
    (and at start: address ADDRESS, then with a dashboard: dashboard URL)
    kill N          -> killed N      (SIGKILL of node N's processes: a lost machine)
    drain N SECONDS -> drained N     (node N drained as preempted, gone in SECONDS: a spot reclaim)
    stop            -> stopped
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager


def _serve(head_cpus: int, dashboard: bool, keep_current: bool) -> None:
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # every address Ray derives stays 127.0.0.1
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    head = {**common, "num_cpus": head_cpus, "num_gpus": 0}
    if dashboard:  # for `ray job submit`: the dashboard on loopback too
        # The job agent keeps Ray's default port (52365), as `ray start --head` gives it: the test
        # session's private instance, started before, must have left it free.
        head.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=_free_port())
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    nodes = {}
    # The head recorded itself as "the latest cluster", which a plain ray.init() elsewhere on this
    # machine would join: take that back, unless the test wants a machine that runs a cluster.
    from disco.pipeline.cluster import ray_address_file

    current = ray_address_file()
    if not keep_current and os.path.exists(current) and open(current).read().strip() == cluster.address:
        os.remove(current)
    print(f"address {cluster.address}", flush=True)
    if dashboard:
        print(f"dashboard http://127.0.0.1:{head['dashboard_port']}", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "add":
            node = cluster.add_node(num_cpus=int(args[0]), num_gpus=int(args[1]) if len(args) > 1 else 0, **common)
            cluster.wait_for_nodes()
            nodes[len(nodes) + 1] = node
            print(f"node {len(nodes)}", flush=True)
        elif command == "drain":  # what a cloud's reclaim notice, or a raylet sent SIGTERM, does
            import time

            from ray._raylet import GcsClient
            from ray.core.generated import autoscaler_pb2

            deadline_ms = int(time.time() * 1000) + int(float(args[1]) * 1000)
            accepted, why = GcsClient(address=cluster.address).drain_node(
                nodes[int(args[0])].node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                "preempted (a test)", deadline_ms)
            print(f"drained {args[0]}" if accepted else f"refused {why}", flush=True)
        elif command == "kill":
            cluster.remove_node(nodes.pop(int(args[0])), allow_graceful=False)
            print(f"killed {args[0]}", flush=True)
        elif command == "stop":
            cluster.shutdown()
            if os.path.exists(current) and open(current).read().strip() == cluster.address:
                os.remove(current)
            print("stopped", flush=True)
            return


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackCluster:
    def __init__(self, process: subprocess.Popen, dashboard: bool):
        self.process = process
        self.address = self._answer("address")
        self.dashboard = self._answer("dashboard") if dashboard else None

    def _answer(self, word: str) -> str:
        line = self.process.stdout.readline()
        if not line.startswith(word):
            raise RuntimeError(f"the cluster process said {line!r}, expected {word!r}; it exited {self.process.poll()}")
        return line.split(maxsplit=1)[1].strip() if " " in line else ""

    def _send(self, command: str, answer: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer(answer)

    def add_node(self, cpus: int, gpus: int = 0) -> int:
        return int(self._send(f"add {cpus} {gpus}", "node"))

    def kill_node(self, node: int) -> None:
        self._send(f"kill {node}", "killed")

    def drain_node(self, node: int, seconds: float) -> None:
        self._send(f"drain {node} {seconds}", "drained")


@contextmanager
def loopback_cluster(head_cpus: int, dashboard: bool = False, keep_current: bool = False):
    # Every Ray process of the cluster (dashboard agents and job drivers included) inherits the
    # switch that keeps Ray's addresses on 127.0.0.1, and the GCS's node health checks: every
    # 0.5 s, a node dead after 3 missed (Ray's defaults, 3 s and 5, take 15 s to notice a lost
    # node; the detection path is the same).
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
    command = [sys.executable, __file__, str(head_cpus), str(int(dashboard)), str(int(keep_current))]
    process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        yield LoopbackCluster(process, dashboard)
        process.stdin.write("stop\n")
        process.stdin.flush()
        process.wait(timeout=60)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the cluster is left, by its group
        except ProcessLookupError:
            pass
        process.wait()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1")
