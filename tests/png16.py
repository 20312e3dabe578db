"""A 16-bit PNG writer for tests: Pillow reads 48-bit PNGs but cannot write them."""
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(array: np.ndarray) -> bytes:
    """A 16-bit grayscale ([H, W]) or 48-bit RGB ([H, W, 3]) PNG of a uint16 array."""
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in array)  # filter byte 0, then the row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
