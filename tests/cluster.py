"""A real Ray cluster on this machine for tests: a head and worker nodes, each a `ray start --block`
process in its own process group on explicit loopback ports, stopped by PID (never `ray stop`)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from deploy.server import free_port

BIN = Path(sys.executable).parent


def stop_group(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM a process started in its own session, and SIGKILL its whole group if it lingers."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def ray_env() -> dict[str, str]:
    """Offline, no auth, fast shutdown, and node deaths noticed within seconds rather than a minute."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port()),
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    return env


class LocalCluster:
    """`with LocalCluster(workers=2) as cluster:` a head and `workers` worker nodes of `cpus` CPUs each.

    `env`: more variables for every node (credentials, an endpoint). `own_dirs`: each node starts in
    a working folder of its own with its own TMPDIR, as nodes that share no disk."""

    def __init__(self, workers: int = 0, cpus: int = 1, dashboard: bool = False, env: dict[str, str] | None = None,
                 own_dirs: bool = False) -> None:
        self.workers, self.cpus, self.dashboard, self.own_dirs = workers, cpus, dashboard, own_dirs
        self.port, self.dashboard_port = free_port(), free_port()
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's Unix sockets live under it
        self.env = {**ray_env(), **(env or {})}
        self.node_dirs: list[Path] = []
        self.head: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, arguments: list[str]) -> subprocess.Popen:
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
        env, cwd = self.env, None
        if self.own_dirs:
            cwd = Path(tempfile.mkdtemp(prefix="node-", dir=self.temp))
            (cwd / "tmp").mkdir()
            self.node_dirs.append(cwd)
            env = {**self.env, "TMPDIR": str(cwd / "tmp")}
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus),
             "--disable-usage-stats", *ports, *arguments],
            env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def start(self) -> "LocalCluster":
        try:
            self.head = self._start(["--head", "--port", str(self.port), "--temp-dir", self.temp,
                                     "--include-dashboard", str(self.dashboard).lower(), "--dashboard-host", "127.0.0.1",
                                     "--dashboard-port", str(self.dashboard_port)])
            self.wait_for_nodes(1)
            for _ in range(self.workers):  # one at a time: two nodes joining at once can leave one out
                self.add_node()
            if self.dashboard:
                self._wait_http(f"{self.dashboard_url}/api/version", 120)
        except BaseException:
            self.stop()  # `with` calls no __exit__ when __enter__ fails: nothing of it may outlive the failure
            raise
        return self

    def add_node(self) -> subprocess.Popen:
        node = self._start(["--address", self.address])
        self.nodes.append(node)
        self.wait_for_nodes(1 + sum(n.poll() is None for n in self.nodes))
        return node

    def node_addresses(self, count: int = 0, seconds: float = 120) -> list[str]:
        """The address Ray gives each live node (not always the loopback it was started on: Ray issue
        59110), once `count` nodes are live (any number for 0). One client polls: each new client
        costs seconds of imports and a connection."""
        script = ("import ray, sys, time; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                  "count, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])\n"
                  "while True:\n"
                  "    alive = [n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]\n"
                  "    if not count or len(alive) == count or time.monotonic() > deadline: break\n"
                  "    time.sleep(0.2)\n"
                  "print(' '.join(alive))")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:  # the head's GCS may not take clients for its first seconds
            result = subprocess.run([sys.executable, "-c", script, self.address, str(count), str(seconds)],
                                    env=self.env, capture_output=True, text=True, timeout=seconds + 60)
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.strip().splitlines()[-1].split()
            time.sleep(1)
        return []

    def wait_for_nodes(self, count: int, seconds: float = 120) -> None:
        if len(self.node_addresses(count, seconds)) != count:
            raise TimeoutError(f"the cluster did not reach {count} live nodes")

    @staticmethod
    def _wait_http(url: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(url)

    def kill_node(self, node: subprocess.Popen) -> None:
        """A whole node gone at once, as when its machine dies: SIGKILL its process group."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        for process in [*self.nodes, self.head]:
            if process is not None:
                stop_group(process)
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
