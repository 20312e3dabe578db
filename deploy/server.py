"""A handle on an embedded Triton in a child process: free ports, readiness, clean stop.

Tests, the batch job and the benchmark start servers through this, so a killed or crashed server
never takes the caller down with it.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from deploy.embedded import ACCESS_TOKEN_ENV, ServeError, ServeOptions, model_names
from deploy.leftovers import Leftovers, orphans


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class EmbeddedServer:
    """`smearscope serve` in its own process group (the named models, or all of the repository),
    ready when the server says every model is."""

    def __init__(
        self,
        repository: Path,
        names: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        threads: int = 0,
        startup_timeout: float = 120.0,
        runtime: str = "auto",
        crops: str = "numpy",
    ) -> None:
        self.repository, self.names, self.host = Path(repository), tuple(names), host
        self.threads, self.startup_timeout, self.runtime, self.crops = threads, startup_timeout, runtime, crops
        self.http_port, self.grpc_port, self.metrics_port = (free_port(host) for _ in range(3))
        self.access_token = secrets.token_urlsafe(24)
        self.process: subprocess.Popen | None = None
        self.log = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self) -> "EmbeddedServer":
        command = [
            sys.executable, "-m", "smearscope", "serve", "--repository", str(self.repository),
            *(["--name", *self.names] if self.names else []),
            "--host", self.host, "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--threads", str(self.threads),
            "--runtime", self.runtime, "--crops", self.crops,
            "--parent-pid", str(os.getpid()),  # a killed launcher must not leave its server running
        ]
        env = {**os.environ, ACCESS_TOKEN_ENV: self.access_token}
        self.log = tempfile.NamedTemporaryFile(prefix="smearscope-serve-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                message = f"server exited with code {self.process.returncode}: {self._last_line()}"
                self.stop()
                raise ServeError(message)
            if self.ready():
                return self
            time.sleep(0.5)
        message = f"server not ready after {self.startup_timeout:.0f}s: {self._last_line()}"
        self.stop()
        raise ServeError(message)

    def ready(self) -> bool:
        """Every model it serves answers ready (the server's own readiness comes before PyTriton loads them)."""
        names = self.names or model_names(ServeOptions(self.repository))
        for name in names:
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{name}/ready", timeout=2) as response:
                    if response.status != 200:
                        return False
            except OSError:
                return False
        return True

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM) without waiting: `stop()` waits for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait (the server stops Triton and removes its own leftovers); kill it if stuck.
        Whatever of it outlived it (a stub naming its region) is killed and its regions unlinked."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        orphans(self.process.pid).remove()
        self._remove_log()

    def kill(self) -> None:
        """Kill the whole server process group at once, as a crash would, then remove what it held:
        its shared-memory segments, which no process of the group lived to unlink."""
        if self.process is not None and self.process.poll() is None:
            leftovers = Leftovers.of_group(self.process.pid)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            leftovers.remove()
        self._remove_log()

    def _remove_log(self) -> None:
        """The server's output is read only while it starts (`_last_line`): nothing of it is left in /tmp."""
        if self.log is not None:
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)

    def _last_line(self) -> str:
        lines = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if "error" in line.lower() and "NVML" not in line and "DCGM" not in line]
        return (errors or lines or ["no output"])[-1][:300]

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
