"""Inputs and decoding of the batch job: archives as streams, and every kind of bad input."""
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.field import FieldSettings
from batch.inputs import DEFAULT_MAX_BYTES, TooLarge, Unreadable, expand, iter_slides, read_file, read_slide
from fields.slides import SlideError, decode
from batch.inputs import plan
from tests.png16 import png16

FIELDS = Path(__file__).parent / "fixtures" / "smears"


def _field_bytes() -> bytes:
    return sorted(FIELDS.glob("*.JPG"))[0].read_bytes()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.mode != "F" else "TIFF")
    return buffer.getvalue()


def test_decode_a_real_field():
    image = decode(_field_bytes())
    assert image.dtype == np.uint8 and image.shape == (960, 1280, 3)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (_field_bytes()[:5000], "corrupt or truncated"),
        (_png(Image.new("F", (20, 20))), "unsupported image mode F"),
        (_png(Image.new("1", (20, 20))), "unsupported image mode 1"),
    ],
)
def test_bad_images_raise_one_line_reasons(data, reason):
    with pytest.raises(SlideError, match=reason) as error:
        decode(data)
    assert "\n" not in str(error.value)


def test_decompression_bombs_are_refused_before_decoding():
    bomb = _png(Image.new("L", (8000, 8000)))
    with pytest.raises(SlideError, match="too large"):
        decode(bomb, max_pixels=50_000_000)
    with pytest.raises(SlideError, match="too large"):
        decode(_field_bytes(), max_pixels=1000)


def test_expand_files_folders_and_globs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "y.PNG").write_bytes(b"1")
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    assert expand([str(tmp_path / "a")]) == [str(tmp_path / "a" / "b" / "x.jpg"), str(tmp_path / "a" / "y.PNG")]
    assert expand([str(tmp_path / "a" / "**" / "*.jpg")]) == [str(tmp_path / "a" / "b" / "x.jpg")]
    with pytest.raises(FileNotFoundError, match="input not found"):
        expand([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="input not found"):
        expand([str(tmp_path / "*.nothing")])


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_archives_are_listed_and_unsafe_members_are_error_rows(tmp_path):
    data = _field_bytes()
    with zipfile.ZipFile(tmp_path / "slides.zip", "w") as archive:
        archive.writestr("../../escape.jpg", data)
        archive.writestr("dir/field.jpg", data)
        archive.writestr("readme.txt", "not an image")
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (0o120777 << 16)  # a symbolic link, as `zip --symlinks` stores it
        archive.writestr(link, "/etc/passwd")
    with tarfile.open(tmp_path / "slides.tar.gz", "w:gz") as archive:
        _tar_add(archive, "one.jpg", data)
        _tar_add(archive, "/abs/two.jpg", data)
        _tar_add(archive, "sym.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _tar_add(archive, "hard.jpg", kind=tarfile.LNKTYPE, link="one.jpg")
        _tar_add(archive, "dev.jpg", kind=tarfile.CHRTYPE)
        _tar_add(archive, "fifo.jpg", kind=tarfile.FIFOTYPE)
        _tar_add(archive, "last.jpg", data)
    slides = {s.slide_id.split("!")[1]: s for s in iter_slides([str(tmp_path / "slides.zip"), str(tmp_path / "slides.tar.gz")])}
    assert [name for name, s in slides.items() if s.error is None] == ["dir/field.jpg", "one.jpg", "last.jpg"]
    assert slides["dir/field.jpg"].data is None and slides["dir/field.jpg"].member == "dir/field.jpg"  # read by its worker
    assert all(read_slide(slides[name], DEFAULT_MAX_BYTES) == data for name in ("dir/field.jpg", "one.jpg", "last.jpg"))
    reasons = {name: s.error for name, s in slides.items() if s.error}
    assert reasons == {
        "../../escape.jpg": "member path outside the archive (..)",
        "link.jpg": "archive member is a symbolic link, not a file",
        "/abs/two.jpg": "absolute member path",
        "sym.jpg": "archive member is a link, not a file",
        "hard.jpg": "archive member is a link, not a file",
        "dev.jpg": "archive member is a device, not a file",
        "fifo.jpg": "archive member is a FIFO, not a file",
    }
    assert len({s.key for s in slides.values()}) == len(slides) and all(s.key.isalnum() for s in slides.values())
    assert not (tmp_path.parent / "escape.jpg").exists()


def test_no_input_is_read_past_the_byte_limit(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as handle:  # 3 GB, sparse: costs no disk, would cost 3 GB of memory if read
        handle.truncate(3 << 30)
    (slide,) = iter_slides([str(huge)])
    assert slide.error.startswith("file too large: 3,221,225,472 bytes")
    huge_tiff = huge.rename(tmp_path / "huge.tif")  # could be a whole-slide image: opened by its header, not read
    ((planned, _),) = plan(next(iter_slides([str(huge_tiff)])), FieldSettings(), DEFAULT_MAX_BYTES)
    assert planned.error.startswith("unreadable whole-slide image")
    with pytest.raises(TooLarge):
        read_file(str(huge_tiff), 1 << 20)  # a file that grew after it was listed: the read stops at the cap
    inflating = b"\0" * (8 << 20)  # deflates to a few kB: a zip bomb in miniature
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.png", inflating)
    with tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as archive:
        _tar_add(archive, "bomb.png", inflating)
        _tar_add(archive, "after.jpg", _field_bytes())
    slides = list(iter_slides([str(tmp_path / "bomb.zip"), str(tmp_path / "bomb.tar.gz")], max_bytes=1 << 20))
    assert [s.error for s in slides] == ["archive member too large: 8,388,608 bytes > 1,048,576 (--max-bytes)"] * 2 + [None]
    assert slides[-1].data == _field_bytes()  # the stream went on past the refused member


def test_things_named_like_images_that_are_not_files(tmp_path):
    import os

    folder = tmp_path / "in"
    (folder / "looks.jpg").mkdir(parents=True)  # a directory named like an image: searched like any folder
    (folder / "looks.jpg" / "inner.jpg").write_bytes(_field_bytes())
    os.mkfifo(folder / "pipe.jpg")  # reading it would block forever
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    slides = {Path(s.slide_id).name: s for s in iter_slides([str(folder)])}
    assert slides["inner.jpg"].error is None
    assert slides["pipe.jpg"].error == "not a regular file (a device, FIFO or socket)"
    assert slides["dangling.jpg"].error.startswith("unreadable file")
    (direct,) = iter_slides([str(folder / "pipe.jpg")])
    assert direct.error.startswith("not a regular file")


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_every_mode_a_camera_writes_decodes_to_rgb(tmp_path):
    import tifffile

    field = np.asarray(Image.open(io.BytesIO(_field_bytes())).convert("RGB"))[:300, :400]
    deep = field.astype(np.uint16) * 257  # 16 bits a channel, same picture
    tiff16, tiff48 = io.BytesIO(), io.BytesIO()
    tifffile.imwrite(tiff16, deep[..., 1])
    tifffile.imwrite(tiff48, deep)
    cases = {
        "16-bit grayscale PNG": png16(deep[..., 1]),
        "16-bit grayscale TIFF": tiff16.getvalue(),
        "48-bit RGB PNG": png16(deep),
        "48-bit RGB TIFF": tiff48.getvalue(),
        "palette PNG": _encoded(Image.fromarray(field).quantize(64), "PNG"),
        "CMYK JPEG": _encoded(Image.fromarray(field).convert("CMYK"), "JPEG"),
        "RGBA PNG": _encoded(Image.fromarray(field).convert("RGBA"), "PNG"),
        "grayscale JPEG": _encoded(Image.fromarray(field).convert("L"), "JPEG"),
    }
    for name, data in cases.items():
        image = decode(data)
        assert image.dtype == np.uint8 and image.shape == (300, 400, 3), name
        assert 60 < image.mean() < 250, name  # not black, not saturated: 16-bit data scaled, not clipped
    png_named_jpg = tmp_path / "really-a-png.jpg"
    png_named_jpg.write_bytes(_encoded(Image.fromarray(field), "PNG"))
    assert np.array_equal(decode(png_named_jpg.read_bytes()), field)


def test_broken_archive_members_become_error_slides(tmp_path):
    data = _field_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("good.jpg", "cut.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "cut.tar").write_bytes(buffer.getvalue()[: 512 + len(data) + 512 + 1000])
    slides = list(iter_slides([str(tmp_path / "cut.tar")]))
    assert slides[0].data == data
    assert slides[-1].error and "broken archive member" in slides[-1].error
    with zipfile.ZipFile(tmp_path / "bad.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.jpg", data)
    raw = bytearray((tmp_path / "bad.zip").read_bytes())
    raw[100:140] = b"\0" * 40  # corrupt the compressed stream: CRC or inflate error on read
    (tmp_path / "bad.zip").write_bytes(bytes(raw))
    (bad,) = list(iter_slides([str(tmp_path / "bad.zip")]))  # its central directory is whole: listed
    with pytest.raises(Unreadable, match="broken archive member"):
        read_slide(bad, DEFAULT_MAX_BYTES)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    (junk,) = list(iter_slides([str(tmp_path / "junk.zip")]))
    assert "unreadable archive" in junk.error
