"""A real, short training run through the console command, and evaluate on what it wrote."""
import json

import pytest

from tests.conftest import call_cli

ARTIFACTS = ("model.keras", "history.csv", "curves.png", "confusion.png", "metrics.json", "split.json", "labels.txt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cells_dir):
    out = tmp_path_factory.mktemp("run")
    result = call_cli(
        "train", "--data", str(cells_dir), "--out", str(out), "--epochs", "2",
        "--steps-per-epoch", "2", "--batch-size", "8", "--rotation", "180", "--channel-gain", "0.25", "--desaturate", "0.8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 2 done" in result.stdout
    return out


@pytest.mark.slow
def test_training_writes_every_artifact(run_dir):
    for name in ARTIFACTS:
        assert (run_dir / name).stat().st_size > 0, name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "per_patient_accuracy"):
        assert key in metrics
    split = json.loads((run_dir / "split.json").read_text())
    assert not set(split["train_patients"]) & set(split["val_patients"])
    assert metrics["images"] == split["val_images"]
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "val_loss" in history[0]
    assert (run_dir / "labels.txt").read_text() == "Parasitized\nUninfected\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["rotation"], config["channel_gain"], config["desaturate"]) == (180, 0.25, 0.8)


@pytest.mark.slow
def test_resume_continues_after_the_last_epoch(run_dir, cells_dir):
    result = call_cli(
        "train", "--data", str(cells_dir), "--out", str(run_dir), "--epochs", "3",
        "--steps-per-epoch", "1", "--batch-size", "8", "--resume",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming after epoch 2" in result.stdout
    assert "epoch 3 done" in result.stdout and "epoch 1 done" not in result.stdout
    assert len((run_dir / "history.csv").read_text().splitlines()) == 4


@pytest.mark.slow
def test_evaluate_keras_model(run_dir, cells_dir, tmp_path):
    result = call_cli("evaluate", "--model", str(run_dir / "model.keras"), "--data", str(cells_dir), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["images"] == len(list(cells_dir.rglob("*.png")))
    assert (tmp_path / "confusion.png").stat().st_size > 0


def test_dry_run_prints_parameter_count():
    result = call_cli("train", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "total parameters: 23,827,330" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (("train", "--data", "/nonexistent", "--out", "OUT"), "data folder not found"),
        (("evaluate", "--model", "/nonexistent.keras", "--data", "."), "model not found"),
        (("data", "stats", "--data", "/nonexistent"), "data folder not found"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, message, tmp_path):
    out = tmp_path / "out"
    result = call_cli(*[str(out) if arg == "OUT" else arg for arg in args])
    assert result.returncode != 0 and not out.exists()  # refused before anything is written
    lines = [line for line in result.stderr.splitlines() if line.startswith("smearscope")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in result.stderr


def test_data_stats_and_preview(cells_dir, tmp_path):
    result = call_cli("data", "stats", "--data", str(cells_dir))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["images_per_class"] == {"Parasitized": 24, "Uninfected": 24}
    assert stats["patients"] == 11
    out = tmp_path / "preview.png"
    assert call_cli("data", "preview", "--data", str(cells_dir), "--out", str(out)).returncode == 0
    assert out.stat().st_size > 10_000
