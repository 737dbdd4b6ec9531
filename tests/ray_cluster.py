"""A throwaway Ray cluster of several nodes on this machine, for the tests.

Each node is a `ray start --block` process of its own (1 CPU, its own temp dir, its own
resources; the second and later nodes on their own loopback address, 127.0.0.N, so that a
driver on this machine always attaches to the head). Stopping a node ends its `ray start`
process and then every process left in that process's session (its raylet, agents and
worker processes), by id: other Ray clusters on the machine are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# token authentication off for the nodes and every driver: a token file that a local `ray.init()`
# left in ~/.ray must not make the test cluster ask for it
SETTINGS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
ENV = {**os.environ, **SETTINGS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    temp_dir: Path

    def processes(self) -> dict[int, str]:
        """Every live process of this node (pid -> name): those in its `ray start` process's session."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getsid(int(entry.name)) == self.proc.pid:
                    found[int(entry.name)] = (entry / "comm").read_text().strip()
            except OSError:  # gone meanwhile, or not ours to see
                continue
        return found

    def alive(self) -> bool:
        """Whether the node still has its raylet."""
        return "raylet" in self.processes().values()

    def kill_raylet(self) -> int:
        """SIGKILL the node's raylet (the node dies as a machine would); returns its pid."""
        for pid, name in self.processes().items():
            if name == "raylet":
                os.kill(pid, signal.SIGKILL)
                return pid
        raise LookupError(f"node {self.name} has no raylet")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.processes():  # anything the node left behind (a worker that outlived its raylet)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class RayCluster:
    """`start()` a head node; `add_node()` joins more; `stop()` ends them all."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Node] = []

    def _start(self, name: str, args: list[str]) -> Node:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"sfray-{name}-", dir="/tmp"))  # short: socket paths are limited
        cmd = [
            RAY,
            "start",
            "--block",
            "--num-cpus",
            "1",
            "--temp-dir",
            str(temp_dir),
            "--resources",
            json.dumps({name: 1}),
            "--object-store-memory",
            str(100 * 2**20),
            "--dashboard-agent-listen-port",
            str(free_port()),
            *args,
        ]
        log = open(temp_dir / "node.log", "wb")  # noqa: SIM115 (the node's lifetime)
        proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, temp_dir)
        self.nodes.append(node)
        return node

    def start(self) -> RayCluster:
        head = self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.port),
                "--include-dashboard",
                "false",
                "--ray-client-server-port",
                str(free_port()),
                "--dashboard-port",  # its head process runs even without the dashboard: no fixed port
                str(free_port()),
            ],
        )
        self._wait(lambda: self._healthy(), head, "the head node did not start")
        import ray

        # the test process is a driver too (it looks at the nodes and kills workers); on this machine's
        # address it attaches to the head, never to a node the tests kill
        ray.init(address=self.address, namespace="safactory", logging_level="ERROR", log_to_driver=False)
        return self

    def add_node(self, name: str, ip: str) -> Node:
        """Join a node at loopback address `ip` (127.0.0.2, ...) and wait until the cluster sees it."""
        before = self.alive_nodes()
        node = self._start(name, ["--address", self.address, "--node-ip-address", ip])
        self._wait(lambda: self.alive_nodes() > before, node, f"node {name} did not join")
        return node

    @staticmethod
    def alive_nodes() -> int:
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"])

    def _healthy(self) -> bool:
        cmd = [RAY, "health-check", "--address", self.address]
        return subprocess.run(cmd, env=ENV, capture_output=True, timeout=60).returncode == 0

    @staticmethod
    def _wait(ready, node: Node, what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if node.proc.poll() is not None or time.monotonic() > deadline:
                log = (node.temp_dir / "node.log").read_text(errors="replace")
                raise RuntimeError(f"{what}; its `ray start` said:\n{log[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        import ray

        ray.shutdown()
        for node in reversed(self.nodes):
            node.stop()
        self.nodes.clear()
