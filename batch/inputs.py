"""Turning --input arguments (files, folders, globs, zip/tar archives) into slides to process.

Archive members are read as streams, never extracted, and their names are only ever labels: output
files are named by a hash of the slide id. No file or member is read past `max_bytes`: the size is
checked before reading and the read itself is capped, so memory never grows with an input's size.
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

from batch.wsi import WSI_SUFFIXES, WholeSlideError, cell_diameter_of, is_slide_candidate, open_slide, smear_tiles
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


def read_file(path: str, max_bytes: int) -> bytes:
    with open(path, "rb") as handle:
        return read_capped(handle, max_bytes)


@dataclass(frozen=True)
class Slide:
    """One image to process: `path` for a plain file, `data` for an archive member, `error` if unreadable."""

    slide_id: str
    source: str
    path: str | None = None
    data: bytes | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        """A file-system-safe, stable name for this slide's outputs."""
        return hashlib.sha1(self.slide_id.encode()).hexdigest()[:16]


def slide_name(slide_id: str) -> str:
    """The file name of a slide: the member's for an archive member (`archive.zip!dir/field.jpg` -> field.jpg)."""
    return Path(slide_id.split(ARCHIVE_SEPARATOR)[-1]).name


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def expand(inputs: list[str]) -> list[Path]:
    """Files, archives and folders named by the arguments; a pattern or path that matches nothing is an error."""
    found: list[Path] = []
    for argument in inputs:
        matches = sorted(Path(m) for m in glob.glob(argument, recursive=True)) if glob.has_magic(argument) else [Path(argument)]
        if not matches or not all(m.exists() for m in matches):
            raise MissingInput(f"input not found: {argument}")
        for match in matches:
            if match.is_dir():
                # Not only regular files: a FIFO or dangling link named like an image becomes an error row.
                found.extend(p for p in sorted(match.rglob("*")) if not p.is_dir() and (is_image(p.name) or is_archive(p)))
            else:
                found.append(match)
    return list(dict.fromkeys(found))


def iter_slides(inputs: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Slide]:
    """Every slide of every input, archive members streamed one at a time."""
    for path in expand(inputs):
        if is_archive(path):
            yield from _archive_slides(path, max_bytes)
        else:
            yield _file_slide(path, max_bytes)


def _file_slide(path: Path, max_bytes: int) -> Slide:
    """A plain file to read on a worker, or its error row (a FIFO or device would block or never end)."""
    slide = Slide(slide_id=str(path), source=str(path), path=str(path))
    try:
        info = path.stat()
    except OSError as error:
        return Slide(slide.slide_id, slide.source, error=f"unreadable file: {error.strerror or error}")
    if not stat.S_ISREG(info.st_mode):
        return Slide(slide.slide_id, slide.source, error="not a regular file (a device, FIFO or socket)")
    if info.st_size > max_bytes and not path.name.lower().endswith(WSI_SUFFIXES):
        return Slide(slide.slide_id, slide.source, error=f"file too large: {info.st_size:,} bytes > {max_bytes:,} (--max-bytes)")
    return slide  # a large whole-slide image is read by tiles (batch/wsi.py), never whole


def unsafe_member(name: str) -> str:
    """Why an archive member's path is refused ('' if it is not): absolute, or climbing out of the archive."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute member path"
    if ".." in Path(name.replace("\\", "/")).parts:
        return "member path outside the archive (..)"
    return ""


def _archive_slides(path: Path, max_bytes: int) -> Iterator[Slide]:
    reader = _zip_members if path.name.lower().endswith(".zip") else _tar_members
    try:
        yield from reader(path, max_bytes)
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as error:
        yield Slide(slide_id=f"{path}", source=str(path), error=f"unreadable archive: {describe(error)}")


def _refusal(name: str, kind: str, size: int, max_bytes: int) -> str:
    """Why a member is not read ('' if it is): its kind, its path, or its declared size."""
    if kind:
        return f"archive member is a {kind}, not a file"
    if reason := unsafe_member(name):
        return reason
    if size > max_bytes:
        return f"archive member too large: {size:,} bytes > {max_bytes:,} (--max-bytes)"
    return ""


def _zip_members(path: Path, max_bytes: int) -> Iterator[Slide]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir() or not is_image(info.filename):
                continue
            slide_id = f"{path}{ARCHIVE_SEPARATOR}{info.filename}"
            kind = "symbolic link" if stat.S_ISLNK(info.external_attr >> 16) else ""
            if reason := _refusal(info.filename, kind, info.file_size, max_bytes):
                yield Slide(slide_id, str(path), error=reason)
                continue
            try:
                with archive.open(info) as member:
                    data = read_capped(member, max_bytes)
            except TooLarge as error:
                yield Slide(slide_id, str(path), error=f"archive member {error}")
                continue
            except (OSError, EOFError, zipfile.BadZipFile, ValueError, zlib.error) as error:
                yield Slide(slide_id, str(path), error=f"broken archive member: {describe(error)}")
                continue
            yield Slide(slide_id, str(path), data=data)


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym() or info.islnk():
        return "link"
    if info.isfifo():
        return "FIFO"
    if info.ischr() or info.isblk():
        return "device"
    return "" if info.isfile() else "special file"


def _tar_members(path: Path, max_bytes: int) -> Iterator[Slide]:
    with tarfile.open(path, mode="r|*") as archive:  # stream mode: one pass, nothing extracted
        for info in archive:
            if info.isdir() or not is_image(info.name):
                continue
            slide_id = f"{path}{ARCHIVE_SEPARATOR}{info.name}"
            if reason := _refusal(info.name, _tar_kind(info), info.size, max_bytes):
                yield Slide(slide_id, str(path), error=reason)
                continue  # the stream skips the member's data on the next step
            try:
                member = archive.extractfile(info)
                data = read_capped(member, max_bytes) if member else b""
            except (OSError, EOFError, tarfile.TarError) as error:
                yield Slide(slide_id, str(path), error=f"broken archive member: {describe(error)}")
                return  # a stream cannot skip past a broken member
            if len(data) != info.size:
                yield Slide(slide_id, str(path), error=f"broken archive member: {len(data)} of {info.size} bytes")
                return
            yield Slide(slide_id, str(path), data=data)


def plan(slide: Slide, settings, max_bytes: int) -> list:
    """What to do with one input: its tiles if it is a whole-slide image (with the cell scale its
    microns per pixel give), else the input itself; an input that fails here is an error Slide."""
    if slide.error or slide.path is None or not is_slide_candidate(Path(slide.path)):
        return [(slide, settings)]
    try:
        whole = open_slide(slide.path, settings.max_pixels)
    except WholeSlideError as error:
        return [(Slide(slide.slide_id, slide.source, error=str(error)), settings)]
    if whole is None:
        size = Path(slide.path).stat().st_size
        if size > max_bytes:
            return [(Slide(slide.slide_id, slide.source,
                           error=f"file too large: {size:,} bytes > {max_bytes:,} (--max-bytes)"), settings)]
        return [(slide, settings)]
    scaled = replace(settings, cell_diameter=cell_diameter_of(whole, settings.cell_diameter))
    return [(tile, scaled) for tile in smear_tiles(whole, scaled.cell_diameter)]
