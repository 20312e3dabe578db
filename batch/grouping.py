"""Which slide each field belongs to: `--group file|folder|manifest|pattern`.

A microscopist reports parasitemia per slide, over many fields. `file` (the default) makes each
image its own slide; `folder` makes each folder of images one slide (for an archive member, its
folder inside the archive); `manifest` reads a CSV with columns `image,slide` (the image as given
on the command line, or its file name); `pattern` takes the slide from the file name with a regular
expression (its group `slide`, or its first group), e.g. NIH-style names `C33P1thinF_IMG_...` with
`--pattern '^(C\\d+[A-Z]?P\\d+)'`. A field no rule names is its own slide, and is counted as such.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from batch.inputs import ARCHIVE_SEPARATOR, slide_name
from batch.wsi import slide_of_tile
from cells.errors import BadInput, MissingInput

GROUPS = ("file", "folder", "manifest", "pattern")


@dataclass(frozen=True)
class Grouping:
    mode: str = "file"
    manifest: dict[str, str] = field(default_factory=dict)  # image (as given, or file name) -> slide
    pattern: re.Pattern | None = None

    def slide_of(self, field_id: str) -> str:
        """The slide a field (its id: a path, or `archive!member`) belongs to; a tile of a
        whole-slide image always belongs to its image."""
        if whole := slide_of_tile(field_id):
            return whole
        if self.mode == "folder":
            archive, _, member = field_id.rpartition(ARCHIVE_SEPARATOR)
            if archive:
                folder = str(Path(member).parent)
                return archive if folder == "." else f"{archive}{ARCHIVE_SEPARATOR}{folder}"
            return str(Path(field_id).parent)
        if self.mode == "manifest":
            return self.manifest.get(field_id) or self.manifest.get(slide_name(field_id)) or field_id
        if self.mode == "pattern":
            match = self.pattern.search(slide_name(field_id))
            if match:
                return match.groupdict().get("slide") or (match.group(1) if match.groups() else match.group(0))
        return field_id


def read_manifest(path: Path) -> dict[str, str]:
    """A CSV with columns `image` and `slide` (others ignored), as {image: slide}."""
    if not Path(path).is_file():
        raise MissingInput(f"manifest not found: {path}")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "slide"} <= set(reader.fieldnames):
            raise BadInput(f"manifest {path} needs columns image,slide (found: {', '.join(reader.fieldnames or [])})")
        return {row["image"].strip(): row["slide"].strip() for row in reader if row["image"] and row["slide"]}


def grouping(mode: str, manifest: Path | None = None, pattern: str | None = None) -> Grouping:
    """The Grouping the flags ask for, or a one-line reason they do not fit together."""
    if mode not in GROUPS:
        raise BadInput(f"--group must be one of {', '.join(GROUPS)}, not {mode!r}")
    if mode == "manifest":
        if manifest is None:
            raise BadInput("--group manifest needs --manifest CSV")
        return Grouping(mode, manifest=read_manifest(manifest))
    if mode == "pattern":
        if not pattern:
            raise BadInput("--group pattern needs --pattern REGEX")
        try:
            return Grouping(mode, pattern=re.compile(pattern))
        except re.error as error:
            raise BadInput(f"--pattern is not a regular expression: {error}") from error
    return Grouping(mode)
