"""Where the batch job reads and writes: local paths and `s3://bucket/key` URIs, through one interface.

pyarrow's file systems (its S3FileSystem is the AWS C++ SDK): pyarrow is already the job's Parquet
library and what Ray Data reads through; its files are random access, so an archive's member or a
whole-slide image's tile is read by range requests, never by downloading the object (measured
against s3fs in docs/performance.md).

Credentials follow the standard AWS chain (environment, shared profile, instance or pod role), each
node resolving its own: none pass through the job, its logs or its outputs. MinIO, Ceph or any
S3-compatible server is named by the standard `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.

Writes are whole or absent. A local file is written beside its target and renamed. S3 has no
rename: an object is uploaded from a finished local file, and S3 shows it only once the upload
completes, so a reader sees the old object, the new one, or none. Writing the same content again
(a retried task) leaves one object.
"""
from __future__ import annotations

import errno
import fnmatch
import functools
import os
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

from cells.errors import UserError

S3 = "s3://"
ATTEMPTS = 6  # per S3 request: the AWS standard retry strategy's exponential back-off, ~1 s to ~20 s in all
CONNECT_TIMEOUT_S = 5
REQUEST_TIMEOUT_S = 60
STREAM_BUFFER = 8 << 20
# What the SDK says when the server did not answer, rather than refused: not the input's fault.
_UNAVAILABLE = ("NETWORK_CONNECTION", "curlCode", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                "REQUEST_TIMEOUT", "Timeout was reached")
_REFUSED = {"ACCESS_DENIED": "access denied", "INVALID_ACCESS_KEY_ID": "access denied (unknown access key)",
            "SIGNATURE_DOES_NOT_MATCH": "access denied (wrong secret key)", "NO_SUCH_BUCKET": "bucket not found"}

Location = str | os.PathLike


def attempts() -> int:
    """Tries per S3 request: AWS_MAX_ATTEMPTS, the AWS SDKs' own setting, where it is set; else ATTEMPTS."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return int(value) if value.isdigit() and int(value) > 0 else ATTEMPTS


class StorageError(UserError, OSError):
    """A location that cannot be used: a missing bucket or key, access denied; one line."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: {reason}")
        self.reason = reason


class StorageUnavailable(StorageError):
    """The object store did not answer, even after retries: not the input's fault, so nothing is
    recorded against it and a rerun takes it up again."""


def is_remote(location: Location) -> bool:
    return os.fspath(location).startswith(S3)


def absolute(location: Location) -> str:
    """A location every node reads the same: an s3:// URI as it is, a local path made absolute."""
    location = os.fspath(location)
    return location if is_remote(location) else str(Path(location).resolve())


def join(location: Location, *names: str) -> str:
    return "/".join([os.fspath(location).rstrip("/"), *names])


def basename(location: Location) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def relative(location: Location, base: Location) -> str:
    """`location` as a path under `base` (both local, or both remote)."""
    return os.fspath(location)[len(os.fspath(base).rstrip("/")) + 1 :]


@functools.cache
def _s3():
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        where = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return fs.S3FileSystem(region=region, connect_timeout=CONNECT_TIMEOUT_S, request_timeout=REQUEST_TIMEOUT_S,
                           retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=attempts()), **where)


def resolve(location: Location):
    """(pyarrow file system, its path) for a location: for pyarrow.parquet's `filesystem=`."""
    from pyarrow import fs

    location = os.fspath(location)
    if is_remote(location):
        return _s3(), location[len(S3) :]
    return fs.LocalFileSystem(), str(Path(location).absolute())


def _refused(error: OSError, location: str) -> StorageError:
    """The SDK's error as one line naming the location, classified: unavailable, or refused (and why)."""
    message = str(error)
    if isinstance(error, FileNotFoundError):
        return StorageError(location, "not found")
    if any(marker in message for marker in _UNAVAILABLE):
        return StorageUnavailable(location, f"storage unavailable after {attempts()} attempts "
                                            f"({message.rsplit(': ', 1)[-1][:80]})")
    reason = next((text for code, text in _REFUSED.items() if code in message), None)
    return StorageError(location, reason or message.splitlines()[0][:160])


@contextmanager
def _errors(location: Location) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        if not is_remote(location):
            raise
        raise _refused(error, os.fspath(location)) from error


def kind(location: Location) -> str:
    """"file", "directory" (an S3 prefix with objects under it) or "missing"."""
    from pyarrow import fs

    filesystem, path = resolve(location)
    with _errors(location):
        info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound and is_remote(location):
        check_bucket(location)
    return {fs.FileType.File: "file", fs.FileType.Directory: "directory"}.get(info.type, "missing")


def check_bucket(location: Location) -> None:
    """StorageError unless the location's bucket exists and this node may use it."""
    from pyarrow import fs

    bucket = f"{S3}{resolve(location)[1].split('/', 1)[0]}"
    with _errors(bucket):
        found = _s3().get_file_info(bucket[len(S3) :]).type != fs.FileType.NotFound
    if not found:
        raise StorageError(bucket, "bucket not found")


def size(location: Location) -> int:
    """The object's or file's size in bytes, asked of the store before any of it is read."""
    filesystem, path = resolve(location)
    with _errors(location):
        info = filesystem.get_file_info(path)
    if info.size is None:
        raise StorageError(os.fspath(location), "not found")
    return info.size


def list_files(location: Location, pattern: str = "") -> list[str]:
    """Every file under a directory or prefix, recursively, sorted; `pattern`: only those whose path
    below `location` matches it (fnmatch, `**` included); a missing prefix lists nothing."""
    from pyarrow import fs

    filesystem, path = resolve(location)
    with _errors(location):
        infos = filesystem.get_file_info(fs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    base = os.fspath(location).rstrip("/")
    found = sorted(join(base, info.path[len(path.rstrip("/")) + 1 :]) for info in infos if info.type == fs.FileType.File)
    return [f for f in found if not pattern or fnmatch.fnmatch(relative(f, base), pattern)]


class _Counted:
    """A readable, seekable file that adds what it reads to this process's count (bytes_read)."""

    def __init__(self, handle, location: Location) -> None:
        self.handle, self.location = handle, location

    def read(self, size: int = -1) -> bytes:
        with _errors(self.location):
            data = self.handle.read() if size is None or size < 0 else self.handle.read(size)
        _count(len(data))
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self.handle.seek(offset, whence)
        except ValueError as error:  # before the start: an OSError, as a file's (zipfile looks for it)
            raise OSError(errno.EINVAL, str(error)) from error

    def tell(self) -> int:
        return self.handle.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.handle.close()

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def __enter__(self) -> "_Counted":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_read_lock = threading.Lock()
_read_bytes = 0


def _count(n: int) -> None:
    global _read_bytes
    with _read_lock:
        _read_bytes += n


def bytes_read() -> int:
    """Bytes this process has read through `open_input` so far: what a run fetched from the store."""
    return _read_bytes


def open_input(location: Location) -> BinaryIO:
    """A random-access file: reads and seeks become range requests on S3."""
    filesystem, path = resolve(location)
    with _errors(location):
        return _Counted(filesystem.open_input_file(path), location)  # type: ignore[return-value]


def open_stream(location: Location) -> BinaryIO:
    """A file read front to back (a tar): on S3, in 8 MiB range requests rather than one per read."""
    filesystem, path = resolve(location)
    with _errors(location):
        return _Counted(filesystem.open_input_stream(path, buffer_size=STREAM_BUFFER), location)  # type: ignore[return-value]


def read_bytes(location: Location) -> bytes:
    with open_input(location) as handle:
        return handle.read()


@contextmanager
def atomic_path(location: Location) -> Iterator[Path]:
    """A local temporary path to write to; it becomes `location` whole, only if the block succeeds.
    The temporary has no name in the file system until it replaces `location` (where the file
    system allows), so a writer killed mid-write leaves no file behind."""
    location = os.fspath(location)
    remote = is_remote(location)
    folder = Path(tempfile.gettempdir() if remote else Path(location).parent)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = _unnamed_file(folder), None
    if handle is None:  # a file system without unnamed files: a named temporary, removed unless killed
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    writable = Path(temporary or f"/proc/self/fd/{handle}")
    try:
        yield writable
        if remote:
            filesystem, path = resolve(location)
            with _errors(location), open(writable, "rb") as source, filesystem.open_output_stream(path) as target:
                shutil.copyfileobj(source, target, 8 << 20)
        else:
            if temporary is None:  # named only for the instant before it replaces the target
                temporary = str(folder / f".tmp-{uuid.uuid4().hex}")
                _name(writable, temporary)
            os.replace(temporary, location)
    finally:
        os.close(handle)
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def _name(unnamed: Path, path: str) -> None:
    """Give the unnamed file open as `unnamed` (/proc/self/fd/N) the name `path`: linkat() following
    the /proc link, which os.link does only when given a directory descriptor."""
    folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(unnamed, os.path.basename(path), dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def _unnamed_file(folder: Path) -> int | None:
    """A writable file in `folder` without a name (Linux's O_TMPFILE), or None where the file system
    has none: a writer killed before naming it (a Ray worker of a stopped job) leaves nothing behind."""
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)
    except (AttributeError, OSError):
        return None


def atomic_write(location: Location, data: str | bytes) -> None:
    with atomic_path(location) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)


def make_output(location: Location) -> None:
    """Ready an output location before any work is done: a local folder is created; a bucket must
    exist and be usable (one line otherwise)."""
    if is_remote(location):
        check_bucket(location)
    else:
        Path(location).mkdir(parents=True, exist_ok=True)
