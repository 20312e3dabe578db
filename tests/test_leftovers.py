"""What killed servers leave (processes, /dev/shm segments) is found by its server's pid and removed;
what belongs to a live server, or to nobody we know, is not touched."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from deploy.leftovers import BACKEND_TEMP, REGION_PREFIX, SHM, Leftovers, orphans

# A stand-in for a stub: maps a segment of its own and a region, names the region in its command line.
STUB = """import mmap, os, sys, time
for name in sys.argv[1:]:
    with open(f"/dev/shm/{name}", "wb+") as handle:
        handle.write(bytes(4096))
        handle.flush()
        globals()[name] = mmap.mmap(handle.fileno(), 4096)
print("ready", flush=True)
time.sleep(120)
"""


def _dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def _stub(*segments: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", STUB, *segments], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


@pytest.fixture
def names():
    made: list[str] = []
    yield made
    for name in made:
        (SHM / name).unlink(missing_ok=True)


def test_a_dead_servers_stub_and_segments_are_removed(names):
    dead = _dead_pid()
    region, segment = f"{REGION_PREFIX}{dead}-0a1b", f"psm_test{os.getpid()}"
    names += [region, segment]
    stub = _stub(region, segment)
    try:
        assert stub.pid not in {p.pid for p in orphans(_dead_pid()).processes}  # another server's leftovers only
        found = orphans(dead)
        assert stub.pid in {p.pid for p in found.processes} and found.server_pids == {dead}
        assert {SHM / region, SHM / segment} <= found.present_segments()
        said = found.remove()
        assert stub.wait(10) == -signal.SIGKILL
        assert not (SHM / region).exists() and not (SHM / segment).exists()
        assert "processes" in said and "shared-memory segments" in said
    finally:
        stub.kill()


def test_a_live_servers_stub_and_an_unknown_segment_are_left_alone(names):
    region, stray = f"{REGION_PREFIX}{os.getpid()}-0a1b", f"psm_stray{os.getpid()}"
    names += [region, stray]
    stub = _stub(region)
    (SHM / stray).write_bytes(bytes(16))  # mapped by nobody, named after no server: not ours to remove
    try:
        found = orphans()
        assert stub.pid not in {p.pid for p in found.processes} and os.getpid() not in found.server_pids
        found.remove()
        assert stub.poll() is None and (SHM / region).exists() and (SHM / stray).exists()
    finally:
        stub.kill()
        stub.wait()


def test_a_tree_snapshot_outlives_its_parent(names):
    """Taken while the children run, it still finds them once they are orphans (the stubs of a server past
    Triton's exit timeout)."""
    segment = f"psm_tree{os.getpid()}"
    names.append(segment)
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                               f"{STUB!r}, {segment!r}], stdout=sys.stdout); sys.stdout.flush(); import time; time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    snapshot = Leftovers.of_tree(parent.pid)
    (child,) = snapshot.processes
    assert SHM / segment in snapshot.segments
    parent.kill()
    parent.wait()
    assert snapshot.live_processes() and snapshot.present_segments()  # the orphan still runs and maps its segment
    snapshot.remove()
    assert not snapshot.live_processes() and not snapshot.present_segments() and not (SHM / segment).exists()


def test_backend_folders_older_than_every_live_triton_are_removed_if_empty(names):
    """Triton's Python backend makes an empty /tmp/python_env_* at start; one older than every live
    tritonserver was a killed server's. One with something in it is not ours to judge."""
    old, kept = BACKEND_TEMP / f"python_env_test{os.getpid()}a", BACKEND_TEMP / f"python_env_test{os.getpid()}b"
    old.mkdir()
    kept.mkdir()
    (kept / "bin").mkdir()
    try:
        for folder in (old, kept):
            os.utime(folder, (0, 0))  # made long before any server started
        Leftovers().remove()
        assert not old.exists() and kept.is_dir()
    finally:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(kept, ignore_errors=True)
