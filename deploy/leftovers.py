"""What an embedded Triton leaves behind when it is not stopped cleanly, and its removal.

`smearscope serve` runs `tritonserver`, which runs a `triton_python_backend_stub` process (and its
helpers) per model instance. Triton's Python backend keeps a `/dev/shm/pytrtion<pid>-*` region per
instance, `<pid>` being the `smearscope serve` process, and makes an empty `/tmp/python_env_*` per
tritonserver; PyTriton passes tensors in `psm_*` segments, copies tritonserver into a workspace
(`~/.cache/pytriton/workspace_*`) and each model into a folder of its own (`$TMPDIR/folder*`). A
clean stop removes all of them; a server killed with SIGKILL, or one whose stubs outlive Triton's
exit timeout, cannot. So the server snapshots its process tree before it exits and removes what is
still there after (`Leftovers.of_tree`), a launcher that kills a server removes what that server's
process group held (`Leftovers.of_group`), and every server removes at start what servers that no
longer run left (`orphans`). Only what can be attributed to a server is touched: its processes, the
segments they map, the folders their command lines name, and the regions named after its pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

SHM = Path("/dev/shm")
BACKEND_TEMP = Path("/tmp")  # where Triton's Python backend makes its python_env_*, whatever TMPDIR says
REGION_PREFIX = "pytrtion"  # PyTriton's `shm-region-prefix-name`: pytrtion<pid of smearscope serve>-<hex>


@dataclass(frozen=True)
class Process:
    """A process as /proc shows it; `started` (clock ticks after boot) tells it from a later one with the same pid."""

    pid: int
    ppid: int
    pgid: int
    started: int


def _read(pid: int) -> Process | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # a zombie only waits for its parent to reap it
        return None
    return Process(pid, ppid=int(fields[1]), pgid=int(fields[2]), started=int(fields[19]))


def running() -> list[Process]:
    """Every live process of the machine (of this PID namespace)."""
    return [p for p in (_read(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit()) if p]


def _alive(process: Process) -> bool:
    now = _read(process.pid)
    return now is not None and now.started == process.started


def descendants(roots: list[Process], everyone: list[Process]) -> list[Process]:
    """`roots` and every process below them."""
    found, frontier = {p.pid: p for p in roots}, [p.pid for p in roots]
    while frontier:
        children = [p for p in everyone if p.ppid in frontier and p.pid not in found]
        found.update((p.pid, p) for p in children)
        frontier = [p.pid for p in children]
    return list(found.values())


def _mapped_segments(processes: list[Process]) -> set[Path]:
    segments = set()
    for process in processes:
        try:
            maps = Path(f"/proc/{process.pid}/maps").read_text()
        except OSError:
            continue
        segments.update(Path(line.split(None, 5)[5].removesuffix(" (deleted)"))
                        for line in maps.splitlines() if len(line.split(None, 5)) == 6 and f" {SHM}/" in line)
    return {s for s in segments if s.parent == SHM}


def _command(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _folders(processes: list[Process]) -> set[Path]:
    """PyTriton's workspace and the backend's model folders, as tritonserver's and the stubs' command lines name them."""
    folders = set()
    for process in processes:
        command = _command(process.pid)
        for argument in command[:1]:
            folders.update(p for p in Path(argument).parents if p.name.startswith("workspace_") and p.parent.name == "pytriton")
        if command and command[0].endswith("triton_python_backend_stub") and len(command) > 1:
            model = Path(command[1]).parents[1]  # <folder>/1/model.py
            if model.name.startswith("folder"):
                folders.add(model)
    return folders


def _stale_backend_folders(everyone: list[Process]) -> set[Path]:
    """Empty `python_env_*` folders made before every live tritonserver started: each tritonserver makes
    one after it starts, so these belong to none that runs. (Boot time is whole seconds, rounded
    down: a start time read here is never later than the real one, so a live server's folder is kept.)"""
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    ticks = os.sysconf("SC_CLK_TCK")
    starts = [boot + p.started / ticks for p in everyone if "".join(_command(p.pid)[:1]).endswith("/tritonserver")]
    oldest = min(starts, default=float("inf"))
    stale = set()
    for folder in BACKEND_TEMP.glob("python_env_*"):
        try:
            if folder.is_dir() and folder.stat().st_mtime < oldest and not any(folder.iterdir()):
                stale.add(folder)
        except OSError:
            continue
    return stale


def _regions(server_pid: int) -> set[Path]:
    return set(SHM.glob(f"{REGION_PREFIX}{server_pid}-*"))


@dataclass
class Leftovers:
    """Processes to kill, shared-memory segments to unlink and folders to remove once a server has
    stopped or been killed."""

    processes: list[Process] = field(default_factory=list)
    segments: set[Path] = field(default_factory=set)
    server_pids: set[int] = field(default_factory=set)
    folders: set[Path] = field(default_factory=set)

    @classmethod
    def of_tree(cls, server_pid: int) -> "Leftovers":
        """A server's own process and everything below it (taken while they run: orphans lose their parent)."""
        everyone = running()
        root = [p for p in everyone if p.pid == server_pid]
        tree = descendants(root, everyone)
        return cls([p for p in tree if p.pid != server_pid], _mapped_segments(tree) | _regions(server_pid), {server_pid},
                   _folders(tree))

    @classmethod
    def of_group(cls, pgid: int) -> "Leftovers":
        """A server started in a process group of its own: every process of the group and below."""
        everyone = running()
        tree = descendants([p for p in everyone if p.pgid == pgid], everyone)
        return cls(tree, _mapped_segments(tree) | _regions(pgid), {pgid}, _folders(tree))

    def live_processes(self) -> list[Process]:
        return [p for p in self.processes if p.pid != os.getpid() and _alive(p)]

    def present_folders(self) -> set[Path]:
        return {f for f in self.folders if f.is_dir()}

    def present_segments(self) -> set[Path]:
        segments = {s for s in self.segments if s.exists()}
        for pid in self.server_pids:
            segments |= _regions(pid)
        return segments

    def remove(self, wait: float = 10.0) -> str:
        """SIGKILL what still runs (stubs ignore SIGTERM), then unlink the segments and folders. Returns what
        was removed, in a line, or "" where there was nothing."""
        processes = self.live_processes()
        for process in processes:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(_alive(p) for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        segments = self.present_segments()
        size = 0
        for segment in segments:
            try:
                size += segment.stat().st_size
                segment.unlink()
            except OSError:
                pass
        folders = self.present_folders() | _stale_backend_folders(running())
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if not (processes or segments or folders):
            return ""
        return (f"{len(processes)} processes, {len(segments)} shared-memory segments ({size / 2**20:.1f} MiB), "
                f"{len(folders)} folders")


def orphans(server_pid: int | None = None) -> Leftovers:
    """What servers that are no longer running (or the one named, once it has exited) left: processes
    that name a dead server's region in their command line (tritonserver, the stubs) with everything
    below them, and regions named after a dead server's pid."""
    everyone = running()
    live = {p.pid for p in everyone}

    def left_by(server: int | None) -> bool:
        return server is not None and server not in live and server_pid in (None, server)

    dead: set[int] = set()
    named: list[Process] = []
    for process in everyone:
        server = _server_pid(" ".join(_command(process.pid)))
        if left_by(server):
            dead.add(server)
            named.append(process)
    for region in SHM.glob(f"{REGION_PREFIX}*-*"):
        server = _server_pid(region.name)
        if left_by(server):
            dead.add(server)
    tree = descendants(named, everyone)
    return Leftovers(tree, _mapped_segments(tree), dead, _folders(tree))


def _server_pid(text: str) -> int | None:
    """The server pid in the first `pytrtion<pid>-` of `text`, if any."""
    start = text.find(REGION_PREFIX)
    if start < 0:
        return None
    digits = text[start + len(REGION_PREFIX):].split("-", 1)[0]
    return int(digits) if digits.isdigit() else None
