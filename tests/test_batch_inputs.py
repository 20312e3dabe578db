"""Inputs and decoding of the batch job: archives as streams, and every kind of bad input."""
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.inputs import expand, iter_slides
from batch.slides import SlideError, decode

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
    assert expand([str(tmp_path / "a")]) == [tmp_path / "a" / "b" / "x.jpg", tmp_path / "a" / "y.PNG"]
    assert expand([str(tmp_path / "a" / "**" / "*.jpg")]) == [tmp_path / "a" / "b" / "x.jpg"]
    with pytest.raises(FileNotFoundError, match="input not found"):
        expand([str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="input not found"):
        expand([str(tmp_path / "*.nothing")])


def test_archives_are_streamed_and_member_names_are_only_labels(tmp_path):
    data = _field_bytes()
    with zipfile.ZipFile(tmp_path / "slides.zip", "w") as archive:
        archive.writestr("../../escape.jpg", data)
        archive.writestr("dir/field.jpg", data)
        archive.writestr("readme.txt", "not an image")
    with tarfile.open(tmp_path / "slides.tar.gz", "w:gz") as archive:
        for name in ("one.jpg", "/abs/two.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    slides = list(iter_slides([str(tmp_path / "slides.zip"), str(tmp_path / "slides.tar.gz")]))
    assert [s.slide_id.split("!")[1] for s in slides] == ["../../escape.jpg", "dir/field.jpg", "one.jpg", "/abs/two.jpg"]
    assert all(s.data == data and s.path is None and s.error is None for s in slides)
    assert len({s.key for s in slides}) == 4 and all(s.key.isalnum() for s in slides)
    assert not (tmp_path.parent / "escape.jpg").exists()


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
    (bad,) = list(iter_slides([str(tmp_path / "bad.zip")]))
    assert bad.error and ("broken archive member" in bad.error or "unreadable archive" in bad.error)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    (junk,) = list(iter_slides([str(tmp_path / "junk.zip")]))
    assert "unreadable archive" in junk.error
