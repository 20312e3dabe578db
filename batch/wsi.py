"""Whole-slide images, read tile by tile: pyramidal TIFF, OME-TIFF, BigTIFF and the TIFF-based
scanner formats (SVS, NDPI) through tifffile, which scikit-image already brings in.

tifffile rather than OpenSlide: it reads these formats in pure Python with no system library, is
the reader the scientific Python stack uses for them (maintained by Christoph Gohlke), and gives
the tiles of each level directly, so a region is decoded from the few tiles it touches and never
from the whole image. Formats that are not TIFF (MRXS, VSI with external files) are an error row.

A slide is cut into tiles of `TILE` level-0 pixels, each read with an overlap of at least one and a
half cell diameters on every side, so a cell whose centre lies in a tile is whole in what is read;
each cell belongs to the tile that holds its centre, so cells on seams are counted exactly once.
Tiles without smear (from the lowest level: no pixel darker than the background) are skipped.
Tiles are the unit of work (one Ray task each) and of resume; their cells come back in level-0
coordinates, and the tiles of a slide are the fields of that slide in the tables.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

from batch.storage import StorageUnavailable, open_input

WSI_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".tf8")
TILE = 2048  # level-0 px: ~30 cells across at IML magnification, a 12 MB RGB read with its overlap
RED_CELL_MICRONS = 7.5  # a human red cell across: microns per pixel from the file set the cell scale
BACKGROUND_LEVEL = 215  # brighter than this in every channel is slide background (Giemsa smears are dark on white)
TILE_SEPARATOR = "#tile-"


class WholeSlideError(ValueError):
    """The file is not a whole-slide image we can read; the reason becomes its error row."""


@dataclass(frozen=True)
class WholeSlide:
    path: str
    width: int
    height: int
    mpp: float | None  # microns per level-0 pixel, when the file says
    levels: tuple[tuple[int, int], ...]  # (height, width) of each level, level 0 first


@dataclass(frozen=True)
class Tile:
    """One unit of work: the core region it owns and the larger region it reads, level-0 px."""

    path: str
    index: int
    core: tuple[int, int, int, int]  # x, y, w, h
    read: tuple[int, int, int, int]

    error: str | None = None  # as on a Slide: the driver treats both alike

    @property
    def field_id(self) -> str:
        return f"{self.path}{TILE_SEPARATOR}{self.index:06d}"

    slide_id = field_id  # the id of the field this tile is in the tables

    @property
    def source(self) -> str:
        return self.path

    @property
    def key(self) -> str:
        return hashlib.sha1(self.field_id.encode()).hexdigest()[:16]

    def owns(self, centre_x: float, centre_y: float) -> bool:
        x, y, w, h = self.core
        return x <= centre_x < x + w and y <= centre_y < y + h


def _page(tif, level: int = 0):
    series = tif.series[0]
    return series.levels[level].keyframe if series.is_pyramidal else series.keyframe


def _mpp(tif) -> float | None:
    """Microns per pixel from OME-XML, an SVS description ("MPP = 0.25") or the resolution tags."""
    page = tif.pages[0]
    description = page.description or ""
    if match := re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or ""):
        return float(match.group(1))
    if match := re.search(r"MPP\s*=\s*([0-9.]+)", description):
        return float(match.group(1))
    resolution, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if resolution and unit and resolution.value[0]:
        per_unit = resolution.value[0] / resolution.value[1]
        microns = {2: 25_400.0, 3: 10_000.0}.get(int(unit.value))  # inch, centimetre
        return microns / per_unit if microns else None
    return None


def open_slide(path: str, min_pixels: int) -> WholeSlide | None:
    """The whole-slide image at `path`, or None if it is an ordinary image (not tiled and pyramidal,
    and not larger than `min_pixels`); WholeSlideError if tifffile cannot read it."""
    import tifffile

    try:
        with open_input(path) as handle, tifffile.TiffFile(handle) as tif:
            series = tif.series[0]
            page = _page(tif)
            height, width = int(page.imagelength), int(page.imagewidth)
            if not page.is_tiled or not (series.is_pyramidal or width * height > min_pixels):
                return None
            if page.samplesperpixel not in (3, 4) or page.dtype != np.uint8:
                raise WholeSlideError(f"whole-slide image with {page.samplesperpixel} samples of {page.dtype}: "
                                      "only 8-bit RGB(A) slides are read")
            levels = tuple((int(level.keyframe.imagelength), int(level.keyframe.imagewidth))
                           for level in (series.levels if series.is_pyramidal else [series]))
            return WholeSlide(str(path), width, height, _mpp(tif), levels)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as error:
        if isinstance(error, (WholeSlideError, StorageUnavailable)):
            raise
        raise WholeSlideError(f"unreadable whole-slide image: {str(error).splitlines()[0][:160]}") from error


def read_region(path: str, region: tuple[int, int, int, int], level: int = 0) -> np.ndarray:
    """RGB uint8 [h, w, 3] of a region of one level, decoded from the tiles it touches only;
    outside the image is background white."""
    import tifffile

    x, y, w, h = region
    out = np.full((h, w, 3), 255, np.uint8)
    with open_input(path) as handle, tifffile.TiffFile(handle) as tif:
        page = _page(tif, level)
        tile_w, tile_h = page.tilewidth, page.tilelength
        across = math.ceil(page.imagewidth / tile_w)
        handle = tif.filehandle
        for row in range(max(0, y // tile_h), min(math.ceil(page.imagelength / tile_h), math.ceil((y + h) / tile_h))):
            for col in range(max(0, x // tile_w), min(across, math.ceil((x + w) / tile_w))):
                index = row * across + col
                handle.seek(page.dataoffsets[index])
                data = handle.read(page.databytecounts[index])
                tile = page.decode(data, index, jpegtables=page.jpegtables)[0][0][..., :3]
                top, left = row * tile_h, col * tile_w
                ys = slice(max(y, top), min(y + h, top + tile_h, page.imagelength))
                xs = slice(max(x, left), min(x + w, left + tile_w, page.imagewidth))
                out[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = tile[ys.start - top : ys.stop - top,
                                                                                   xs.start - left : xs.stop - left]
    return out


def smear_tiles(slide: WholeSlide, cell_diameter: float, tile: int = TILE) -> list[Tile]:
    """The tiles of the slide that hold smear, judged on its lowest level; overlap 1.5 cell diameters."""
    overlap = math.ceil(1.5 * cell_diameter)
    level = len(slide.levels) - 1
    low_h, low_w = slide.levels[level]
    thumbnail = read_region(slide.path, (0, 0, low_w, low_h), level)
    smear = (thumbnail < BACKGROUND_LEVEL).any(axis=2)
    scale_x, scale_y = low_w / slide.width, low_h / slide.height
    tiles = []
    for y in range(0, slide.height, tile):
        for x in range(0, slide.width, tile):
            w, h = min(tile, slide.width - x), min(tile, slide.height - y)
            x0, y0 = int(x * scale_x), int(y * scale_y)
            x1, y1 = max(x0 + 1, math.ceil((x + w) * scale_x)), max(y0 + 1, math.ceil((y + h) * scale_y))
            if smear[y0:y1, x0:x1].any():
                read = (x - overlap, y - overlap, w + 2 * overlap, h + 2 * overlap)
                tiles.append(Tile(slide.path, len(tiles), (x, y, w, h), read))
    return tiles


def cell_diameter_of(slide: WholeSlide, default: float) -> float:
    """A red cell's diameter in level-0 px: from the file's microns per pixel when known."""
    return RED_CELL_MICRONS / slide.mpp if slide.mpp else default


def is_slide_candidate(path: str) -> bool:
    return path.lower().endswith(WSI_SUFFIXES)


def slide_of_tile(field_id: str) -> str | None:
    """The whole-slide image a tile's field id belongs to, or None for an ordinary field."""
    path, separator, _ = field_id.partition(TILE_SEPARATOR)
    return path if separator else None


def deduplicate_seams(results: list, tile: int = TILE) -> list:
    """Cells found twice, once by each tile beside a seam (each tile saw the cell with other
    surroundings, so their boxes' centres fell on either side): the later tile's copy is dropped
    and its counts recomputed. Only cells within a tile's overlap of a seam are compared."""
    from dataclasses import replace

    from cells.contract import CLASSES, PARASITIZED
    from cells.detection_eval import iou_matrix

    tiles = [r for r in results if slide_of_tile(r.field) and r.status == "ok"]
    near: dict[tuple, list[tuple[int, int]]] = {}  # seam segment -> (result index, cell index)
    for i, result in enumerate(tiles):
        for j, cell in enumerate(result.cell_rows):
            cx, cy = cell["x"] + cell["w"] / 2, cell["y"] + cell["h"] / 2
            reach = max(cell["w"], cell["h"])
            slide = slide_of_tile(result.field)
            for axis, centre, other in (("x", cx, cy), ("y", cy, cx)):
                seam = round(centre / tile) * tile
                if seam and abs(centre - seam) < reach:
                    near.setdefault((slide, axis, seam, int(other // tile)), []).append((i, j))
    dropped: set[tuple[int, int]] = set()
    for members in near.values():
        boxes = [tuple(tiles[i].cell_rows[j][k] for k in ("x", "y", "w", "h")) for i, j in members]
        overlaps = np.triu(iou_matrix(boxes, boxes) >= 0.5, k=1)
        for a, b in zip(*np.nonzero(overlaps)):
            first, second = sorted((members[a], members[b]))
            if first[0] != second[0]:  # two tiles, not one tile's two boxes
                dropped.add(second)
    if not dropped:
        return results
    cleaned = {}
    for i, result in enumerate(tiles):
        keep = [cell for j, cell in enumerate(result.cell_rows) if (i, j) not in dropped]
        if len(keep) != len(result.cell_rows):
            parasitized = sum(cell["label"] == CLASSES[PARASITIZED] for cell in keep)
            cleaned[id(result)] = replace(result, cell_rows=keep, cells=len(keep), parasitized=parasitized,
                                          parasitemia_pct=100.0 * parasitized / len(keep) if keep else 0.0)
    return [cleaned.get(id(r), r) for r in results]
