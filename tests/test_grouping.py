"""Slides of many fields: grouping rules, the per-slide table and its confidence interval."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from batch.grouping import grouping
from batch.results import SLIDE_COLUMNS, FieldResult, failed, slide_row, write_part, write_tables
from cells.errors import BadInput, MissingInput
from cells.stats import wilson_interval


def test_wilson_interval_on_known_counts():
    assert wilson_interval(5, 100) == pytest.approx((0.02154, 0.11175), abs=1e-4)
    low, high = wilson_interval(0, 100)  # no parasite seen: the interval still says how few there could be
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.03699, abs=1e-4)
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(20, 2000), wilson_interval(1, 100)  # same 1 %, 20x the cells
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3


def test_grouping_rules(tmp_path):
    assert grouping("file").slide_of("/data/a/x.jpg") == "/data/a/x.jpg"
    folder = grouping("folder")
    assert folder.slide_of("/data/slide7/field1.jpg") == "/data/slide7"
    assert folder.slide_of("/data/all.zip!slide3/f.jpg") == "/data/all.zip!slide3"
    assert folder.slide_of("/data/all.zip!f.jpg") == "/data/all.zip"
    nih = grouping("pattern", pattern=r"^(?P<slide>C\d+[A-Z]?P\d+)")
    assert nih.slide_of("/x/C33P1thinF_IMG_20150619_114756a.png") == "C33P1"
    assert nih.slide_of("/x/unnamed.png") == "/x/unnamed.png"  # no match: a slide of its own
    assert grouping("pattern", pattern=r"^(\w+?)_").slide_of("/x/s12_field3.jpg") == "s12"
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,slide,notes\n/x/a.jpg,S1,\nb.jpg,S1,\nc.jpg,S2,\n")
    by_manifest = grouping("manifest", manifest)
    assert [by_manifest.slide_of(f) for f in ("/x/a.jpg", "/y/b.jpg", "/z/c.jpg", "/z/d.jpg")] == ["S1", "S1", "S2", "/z/d.jpg"]
    with pytest.raises(BadInput, match="needs --manifest"):
        grouping("manifest")
    with pytest.raises(MissingInput):
        grouping("manifest", tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("file,group\na,b\n")
    with pytest.raises(BadInput, match="image,slide"):
        grouping("manifest", tmp_path / "bad.csv")
    with pytest.raises(BadInput, match="regular expression"):
        grouping("pattern", pattern="([")


def _field(name: str, cells: int, parasitized: int) -> FieldResult:
    rows = [{"field": name, "cell_id": i, "x": 0, "y": 0, "w": 1, "h": 1, "area": 1,
             "p_parasitized": 0.9 if i < parasitized else 0.1, "label": "Parasitized" if i < parasitized else "Uninfected"}
            for i in range(cells)]
    return FieldResult(field=name, source=name, status="ok", width=10, height=10, cells=cells, parasitized=parasitized,
                       parasitemia_pct=100 * parasitized / cells, cell_rows=rows)


def test_a_slide_with_one_bad_field_keeps_the_others_and_says_so(tmp_path):
    results = [_field("/s1/a.jpg", 1200, 12), _field("/s1/b.jpg", 900, 9), failed("/s1/c.jpg", "/s1/c.jpg", "corrupt or truncated image"),
               _field("/s2/d.jpg", 300, 0)]
    for index, result in enumerate(results):
        write_part(tmp_path, f"part{index}", result)
    tables = write_tables(tmp_path, grouping("folder").slide_of, min_cells=2000)
    slides = {row["slide"]: row for row in pq.read_table(tmp_path / "slides.parquet").to_pylist()}
    assert list(pq.read_table(tmp_path / "slides.parquet").column_names) == list(SLIDE_COLUMNS)
    one, two = slides["/s1"], slides["/s2"]
    assert (one["fields"], one["fields_ok"], one["fields_error"], one["cells"], one["parasitized"]) == (3, 2, 1, 2100, 21)
    assert one["parasitemia_pct"] == pytest.approx(1.0) and one["enough_cells"] and not two["enough_cells"]
    assert one["ci_low_pct"] < 1.0 < one["ci_high_pct"] and "c.jpg: corrupt or truncated image" in one["errors"]
    assert two["parasitized"] == 0 and two["ci_low_pct"] == pytest.approx(0) and two["ci_high_pct"] > 1.0
    fields = pq.read_table(tmp_path / "fields.parquet").to_pylist()
    assert [(f["slide"], f["field"]) for f in fields] == [("/s1", "/s1/a.jpg"), ("/s1", "/s1/b.jpg"),
                                                          ("/s1", "/s1/c.jpg"), ("/s2", "/s2/d.jpg")]
    cells = pq.read_table(tmp_path / "cells.parquet").to_pylist()
    assert tables.cells == len(cells) == 2400 and {c["slide"] for c in cells} == {"/s1", "/s2"}
    assert slide_row("/none", [failed("x", "x", "empty file (0 bytes)")])["status"] == "error"
