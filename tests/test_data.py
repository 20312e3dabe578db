import shutil
from pathlib import Path

import pytest

from train.data import DataError, list_samples, load_cells, patient_id, split_samples

SHARED_CELLS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cells"

NAME_FORMS = {
    "C33P1thinF_IMG_20150619_114756a_cell_179.png": "P1",
    "C51AP12thinF_IMG_20150724_152222_cell_44.png": "P12",
    "C37BP2_thinF_IMG_20150620_131423a_cell_92.png": "P2",
    "C189P150ThinF_IMG_20151203_142224_cell_84.png": "P150",
    "C1_thinF_IMG_20150604_104722_cell_9.png": "C1",
    "C2NThinF_IMG_20150604_114631_cell_10.png": "C2",
    "C3thin_original_IMG_20150608_162835_cell_101.png": "C3",
    "C7NthinF_IMG_20150611_104158_cell_11.png": "C7",
    "C201ThinF_IMG_20151029_105935_cell_3.png": "C201",
}


@pytest.mark.parametrize("name,patient", sorted(NAME_FORMS.items()))
def test_patient_id_name_forms(name, patient):
    assert patient_id(name) == patient


def test_patient_id_rejects_foreign_names():
    with pytest.raises(ValueError, match="patient"):
        patient_id("cell_001.png")


@pytest.mark.skipif(not SHARED_CELLS.is_dir(), reason="shared NIH data not present")
def test_every_shared_name_parses_to_110_patients():
    patients = {s.patient for s in list_samples(SHARED_CELLS)}
    assert len(patients) == 110
    assert sum(p.startswith("P") for p in patients) == 82


def test_patient_split_is_disjoint_and_stratified(cells_dir):
    samples = list_samples(cells_dir)
    for seed in range(5):
        train, val, info = split_samples(samples, "patient", 0.3, seed)
        train_p, val_p = {s.patient for s in train}, {s.patient for s in val}
        assert not train_p & val_p
        assert train_p | val_p == {s.patient for s in samples}
        for side in (train_p, val_p):
            assert any(p.startswith("P") for p in side) and any(p.startswith("C") for p in side)
        assert info["train_images"] + info["val_images"] == len(samples)


def test_random_split_sizes(cells_dir):
    samples = list_samples(cells_dir)
    train, val, info = split_samples(samples, "random", 0.3, 0)
    assert len(val) == round(0.3 * len(samples))
    assert {s.path for s in train}.isdisjoint({s.path for s in val})


def test_bad_files_are_skipped_and_counted(tmp_path, cells_dir):
    data = tmp_path / "cells"
    shutil.copytree(cells_dir, data)
    (data / "Parasitized" / "C33P1thinF_empty_cell_1.png").write_bytes(b"")
    (data / "Uninfected" / "C33P1thinF_text_cell_2.png").write_text("not an image")
    good = next((data / "Uninfected").glob("C3thin*.png"))
    (data / "Uninfected" / "C3thin_truncated_cell_3.png").write_bytes(good.read_bytes()[:200])
    cells = load_cells(list_samples(data))
    assert len(cells.skipped) == 3
    assert len(cells.labels) == len(list(cells_dir.rglob("*.png")))


def test_unusable_folders_raise_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_samples(tmp_path / "nowhere")
    (tmp_path / "Parasitized").mkdir()
    with pytest.raises(DataError, match="missing class folder"):
        list_samples(tmp_path)
    (tmp_path / "Uninfected").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_samples(tmp_path)
