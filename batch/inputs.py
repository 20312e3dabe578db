"""Turning --input arguments (files, folders, globs, zip/tar archives; local or s3://, through
batch.storage) into slides to process.

Archive members are never extracted, and their names are only ever labels: output files are named
by a hash of the slide id. A zip's members are listed from its central directory and each is read
by the worker that analyses it (range requests on S3); a tar has no index, so it is read in one
pass by the driver, which sends each member's bytes with its slide. No file, object or member is
read past `max_bytes`: the size is checked before reading and the read itself is capped, so memory
never grows with an input's size.
Every image-named input is either a slide or an error row that says why not (a link or device in
an archive, a member path outside the archive, a file too large, something that is not a file).
"""
from __future__ import annotations

import glob
import hashlib
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterator

from batch import storage
from batch.wsi import WholeSlideError, cell_diameter_of, is_slide_candidate, open_slide, smear_tiles
from cells.contract import IMAGE_SUFFIXES
from cells.errors import MissingInput, describe

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
ARCHIVE_SEPARATOR = "!"  # slide id of an archive member: <archive path>!<member name>
DEFAULT_MAX_BYTES = 512 << 20  # a 50 MP 16-bit RGB TIFF is 300 MB; larger is not a field


class TooLarge(ValueError):
    """More bytes than the limit: not read any further."""


def read_capped(stream: BinaryIO, max_bytes: int) -> bytes:
    """All of `stream`, or TooLarge once it passes `max_bytes` (never more than max_bytes + 1 held)."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"larger than the {max_bytes:,}-byte limit (--max-bytes)")
    return data


def read_file(location: str, max_bytes: int) -> bytes:
    """A file's or object's bytes: its size is asked before any is read, and the read is capped too
    (a file that grew after it was listed)."""
    if (found := storage.size(location)) > max_bytes:
        raise TooLarge(f"too large: {found:,} bytes > {max_bytes:,} (--max-bytes)")
    with storage.open_input(location) as handle:
        return read_capped(handle, max_bytes)


class Unreadable(ValueError):
    """An input whose bytes cannot be had; the message is its error row."""


@dataclass(frozen=True)
class Slide:
    """One image to process: `path` for a file or object (with `member`: a zip's member, read where the
    slide is analysed), `data` for a tar's member, `error` if unreadable."""

    slide_id: str
    source: str
    path: str | None = None
    data: bytes | None = None
    error: str | None = None
    member: str | None = None

    @property
    def key(self) -> str:
        """A file-system-safe, stable name for this slide's outputs."""
        return hashlib.sha1(self.slide_id.encode()).hexdigest()[:16]


def slide_name(slide_id: str) -> str:
    """The file name of a slide: the member's for an archive member (`archive.zip!dir/field.jpg` -> field.jpg)."""
    return Path(slide_id.split(ARCHIVE_SEPARATOR)[-1]).name


def is_archive(location: str) -> bool:
    return location.lower().endswith(ARCHIVE_SUFFIXES)


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def expand(inputs: list[str]) -> list[str]:
    """Files, objects, archives and folders (or prefixes) named by the arguments, as locations; a
    pattern or location that matches nothing is an error."""
    found: list[str] = []
    for argument in inputs:
        matches = _matches(argument)
        if not matches:
            raise MissingInput(f"input not found: {argument}")
        found.extend(matches)
    return list(dict.fromkeys(found))


def _wanted(location: str) -> bool:
    return is_image(location) or is_archive(location)


def _remote_matches(argument: str) -> list[str]:
    """An object itself, or the images and archives under a prefix or matching a pattern below a fixed prefix."""
    if glob.has_magic(argument):
        parts = argument.split("/")
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return [f for f in storage.list_files("/".join(parts[:fixed]), "/".join(parts[fixed:])) if _wanted(f)]
    kind = storage.kind(argument)
    if kind == "file":
        return [argument]
    return [f for f in storage.list_files(argument) if _wanted(f)] if kind == "directory" else []


def _matches(argument: str) -> list[str]:
    """What one argument names: images and archives under a folder or prefix, those matching a pattern."""
    if storage.is_remote(argument):
        return _remote_matches(argument)
    matches = sorted(Path(m) for m in glob.glob(argument, recursive=True)) if glob.has_magic(argument) else [Path(argument)]
    if not all(m.exists() for m in matches):
        return []
    found = []
    for match in matches:
        if match.is_dir():
            # Not only regular files: a FIFO or dangling link named like an image becomes an error row.
            found.extend(str(p) for p in sorted(match.rglob("*")) if not p.is_dir() and _wanted(p.name))
        else:
            found.append(str(match))
    return found


def iter_slides(inputs: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Slide]:
    """Every slide of every input, archive members one at a time."""
    for location in expand(inputs):
        if is_archive(location):
            yield from _archive_slides(location, max_bytes)
        else:
            yield _file_slide(location, max_bytes)


def _file_slide(location: str, max_bytes: int) -> Slide:
    """A file or object to read on a worker, or its error row (a FIFO or device would block or never end)."""
    slide = Slide(slide_id=location, source=location, path=location)
    if storage.is_remote(location):
        try:
            found = storage.size(location)
        except storage.StorageUnavailable:
            raise
        except storage.StorageError as error:
            return Slide(location, location, error=f"unreadable object: {error.reason}")
    else:
        try:
            info = Path(location).stat()
        except OSError as error:
            return Slide(location, location, error=f"unreadable file: {error.strerror or error}")
        if not stat.S_ISREG(info.st_mode):
            return Slide(location, location, error="not a regular file (a device, FIFO or socket)")
        found = info.st_size
    if found > max_bytes and not is_slide_candidate(location):
        return Slide(location, location, error=f"file too large: {found:,} bytes > {max_bytes:,} (--max-bytes)")
    return slide  # a large whole-slide image is read by tiles (batch/wsi.py), never whole


def unsafe_member(name: str) -> str:
    """Why an archive member's path is refused ('' if it is not): absolute, or climbing out of the archive."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute member path"
    if ".." in Path(name.replace("\\", "/")).parts:
        return "member path outside the archive (..)"
    return ""


def _archive_slides(location: str, max_bytes: int) -> Iterator[Slide]:
    reader = _zip_members if location.lower().endswith(".zip") else _tar_members
    try:
        yield from reader(location, max_bytes)
    except storage.StorageUnavailable:
        raise
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as error:
        yield Slide(slide_id=location, source=location, error=f"unreadable archive: {describe(error)}")


def _refusal(name: str, kind: str, size: int, max_bytes: int) -> str:
    """Why a member is not read ('' if it is): its kind, its path, or its declared size."""
    if kind:
        return f"archive member is a {kind}, not a file"
    if reason := unsafe_member(name):
        return reason
    if size > max_bytes:
        return f"archive member too large: {size:,} bytes > {max_bytes:,} (--max-bytes)"
    return ""


def _zip_members(location: str, max_bytes: int) -> Iterator[Slide]:
    """The zip's image members from its central directory, each to be read where it is analysed."""
    with storage.open_input(location) as handle, zipfile.ZipFile(handle) as archive:
        for info in archive.infolist():
            if info.is_dir() or not is_image(info.filename):
                continue
            slide_id = f"{location}{ARCHIVE_SEPARATOR}{info.filename}"
            kind = "symbolic link" if stat.S_ISLNK(info.external_attr >> 16) else ""
            reason = _refusal(info.filename, kind, info.file_size, max_bytes)
            yield Slide(slide_id, location, error=reason) if reason else Slide(slide_id, location, path=location,
                                                                                 member=info.filename)


def read_member(location: str, member: str, max_bytes: int) -> bytes:
    """A zip member's bytes, read by range from its archive; Unreadable with the reason if not."""
    try:
        with storage.open_input(location) as handle, zipfile.ZipFile(handle) as archive, archive.open(member) as data:
            return read_capped(data, max_bytes)
    except TooLarge as error:
        raise Unreadable(f"archive member {error}") from error
    except storage.StorageError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError, zlib.error) as error:
        raise Unreadable(f"broken archive member: {describe(error)}") from error


def read_slide(slide: Slide, max_bytes: int) -> bytes:
    """The encoded bytes of a slide that is not a whole-slide tile: carried, a zip member, or a file
    or object; Unreadable with its error row's reason if not (StorageUnavailable passes through)."""
    if slide.data is not None:
        return slide.data
    if slide.member is not None:
        return read_member(slide.path, slide.member, max_bytes)
    try:
        return read_file(slide.path, max_bytes)
    except TooLarge as error:
        raise Unreadable(f"file {error}") from error
    except storage.StorageUnavailable:
        raise
    except OSError as error:
        raise Unreadable(f"unreadable file: {getattr(error, 'strerror', None) or error}") from error


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym() or info.islnk():
        return "link"
    if info.isfifo():
        return "FIFO"
    if info.ischr() or info.isblk():
        return "device"
    return "" if info.isfile() else "special file"


def _tar_members(location: str, max_bytes: int) -> Iterator[Slide]:
    with storage.open_stream(location) as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:  # one pass
        for info in archive:
            if info.isdir() or not is_image(info.name):
                continue
            slide_id = f"{location}{ARCHIVE_SEPARATOR}{info.name}"
            if reason := _refusal(info.name, _tar_kind(info), info.size, max_bytes):
                yield Slide(slide_id, location, error=reason)
                continue  # the stream skips the member's data on the next step
            try:
                member = archive.extractfile(info)
                data = read_capped(member, max_bytes) if member else b""
            except (OSError, EOFError, tarfile.TarError) as error:
                yield Slide(slide_id, location, error=f"broken archive member: {describe(error)}")
                return  # a stream cannot skip past a broken member
            if len(data) != info.size:
                yield Slide(slide_id, location, error=f"broken archive member: {len(data)} of {info.size} bytes")
                return
            yield Slide(slide_id, location, data=data)


def plan(slide: Slide, settings, max_bytes: int) -> list:
    """What to do with one input: its tiles if it is a whole-slide image (with the cell scale its
    microns per pixel give), else the input itself; an input that fails here is an error Slide."""
    if slide.error or slide.path is None or slide.member is not None or not is_slide_candidate(slide.path):
        return [(slide, settings)]
    try:
        whole = open_slide(slide.path, settings.max_pixels)
    except WholeSlideError as error:
        return [(Slide(slide.slide_id, slide.source, error=str(error)), settings)]
    if whole is None:
        size = storage.size(slide.path)
        if size > max_bytes:
            return [(Slide(slide.slide_id, slide.source,
                           error=f"file too large: {size:,} bytes > {max_bytes:,} (--max-bytes)"), settings)]
        return [(slide, settings)]
    scaled = replace(settings, cell_diameter=cell_diameter_of(whole, settings.cell_diameter))
    return [(tile, scaled) for tile in smear_tiles(whole, scaled.cell_diameter)]
