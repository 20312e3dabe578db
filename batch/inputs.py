"""Turning --input arguments (files, folders, globs, zip/tar archives) into slides to process.

Archive members are read as streams, never extracted, and their names are only ever labels: output
files are named by a hash of the slide id, so a member called '../../etc/x' cannot write anywhere.
"""
from __future__ import annotations

import glob
import hashlib
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cells.contract import IMAGE_SUFFIXES
from cells.errors import MissingInput, describe

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
ARCHIVE_SEPARATOR = "!"  # slide id of an archive member: <archive path>!<member name>


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
                found.extend(p for p in sorted(match.rglob("*")) if p.is_file() and (is_image(p.name) or is_archive(p)))
            else:
                found.append(match)
    return list(dict.fromkeys(found))


def iter_slides(inputs: list[str]) -> Iterator[Slide]:
    """Every slide of every input, archive members streamed one at a time."""
    for path in expand(inputs):
        if is_archive(path):
            yield from _archive_slides(path)
        else:
            yield Slide(slide_id=str(path), source=str(path), path=str(path))


def _archive_slides(path: Path) -> Iterator[Slide]:
    reader = _zip_members if path.name.lower().endswith(".zip") else _tar_members
    try:
        yield from reader(path)
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as error:
        yield Slide(slide_id=f"{path}", source=str(path), error=f"unreadable archive: {describe(error)}")


def _zip_members(path: Path) -> Iterator[Slide]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir() or not is_image(info.filename):
                continue
            slide_id = f"{path}{ARCHIVE_SEPARATOR}{info.filename}"
            try:
                with archive.open(info) as member:
                    data = member.read()
            except (OSError, EOFError, zipfile.BadZipFile, ValueError, zlib.error) as error:
                yield Slide(slide_id, str(path), error=f"broken archive member: {describe(error)}")
                continue
            yield Slide(slide_id, str(path), data=data)


def _tar_members(path: Path) -> Iterator[Slide]:
    with tarfile.open(path, mode="r|*") as archive:  # stream mode: one pass, nothing extracted
        for info in archive:
            if not info.isfile() or not is_image(info.name):
                continue
            slide_id = f"{path}{ARCHIVE_SEPARATOR}{info.name}"
            try:
                member = archive.extractfile(info)
                data = member.read() if member else b""
            except (OSError, EOFError, tarfile.TarError) as error:
                yield Slide(slide_id, str(path), error=f"broken archive member: {describe(error)}")
                return  # a stream cannot skip past a broken member
            if len(data) != info.size:
                yield Slide(slide_id, str(path), error=f"broken archive member: {len(data)} of {info.size} bytes")
                return
            yield Slide(slide_id, str(path), data=data)


