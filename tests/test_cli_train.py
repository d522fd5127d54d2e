"""``napari-mamba-seg train`` and ``evaluate`` on a tiny nnU-Net v2 raw data set.

Training must leave loadable bundles whose cards describe the data, continue a saved run at its step, never touch an
existing run without --resume/--overwrite, stop cleanly on Ctrl-C, and report user errors in one line. ``evaluate``
must print (and write as CSV) exactly the Dice and HD95 the engine computes on the predictor's output.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from squares_dataset import write_squares_dataset

from napari_mamba_seg import cli
from napari_mamba_seg._cli_training import split_cases
from napari_mamba_seg.bundles import ModelCard, load_bundle, save_bundle
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.models import create_model
from napari_mamba_seg.training import Trainer, dice_per_class, hd95, load_nnunet_raw, read_trainer_state

CASES = ("BR_001", "BR_002", "BR_003", "BR_004")
TINY_RUN = ["--arch", "test_unet", "--patch-size", "16", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread, also for the module fixtures: on 2 shared, busy cores two OpenMP threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_env_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main's OMP_WAIT_POLICY default must not leak into other tests."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))


def _write_dataset(root: Path) -> Path:
    """Dataset042_Squares: 4 cases with a bright square of a different size each = label 1."""
    return write_squares_dataset(root, {case: (4 + n, 6 + 2 * n) for n, case in enumerate(CASES)})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 3-step run with one validation and one checkpoint at step 3: (OUTDIR, its stdout)."""
    output = tmp_path_factory.mktemp("runs") / "v1"
    argv = ["train", str(dataset), "-o", str(output), *TINY_RUN, "--steps", "3", "--val-every", "3"]
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        assert cli.main([*argv, "--checkpoint-every", "3"]) == 0
    return output, stdout.getvalue()


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _script() -> Path:
    return Path(sys.executable).parent / "napari-mamba-seg"


# ---------------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "train",
            [
                "DATASET",
                "--output",
                "--arch",
                "--from-bundle",
                "--steps",
                "--batch-size",
                "--patch-size",
                "--lr",
                "--ema-decay",
                "--val-fraction",
                "--val-cases",
                "--seed",
                "--device",
                "--val-every",
                "--checkpoint-every",
                "--patience",
                "--resume",
                "--overwrite",
                "--normalization",
                "--cache-cases",
                "--quiet",
                "--debug",
            ],
        ),
        ("evaluate", ["DATASET", "--model", "--cases", "--hd95", "--csv", "--device", "--overwrite", "--quiet"]),
    ],
)
def test_help_documents_the_command_and_every_option(command: str, options: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and command in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"usage: napari-mamba-seg {command}" in text
    assert "nnU-Net v2 raw data set" in text and "Exit status" in text
    if command == "train":
        assert "torchrun" in text
    for option in options:
        assert option in text, option
    assert command in cli.__doc__


def test_main_sets_passive_openmp_waiting_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


# --------------------------------------------------------------------------------------------------------- split


def test_the_validation_split_is_deterministic_in_the_seed_and_never_empties_training() -> None:
    names = [f"case_{i:02d}" for i in range(10)]
    train, val = split_cases(names, val_fraction=0.2, seed=3)
    assert split_cases(names, val_fraction=0.2, seed=3) == (train, val)
    assert len(val) == 2 and sorted(train + val) == names and not set(train) & set(val)
    assert val == [names[i] for i in sorted(np.random.default_rng(3).permutation(10)[:2])]
    assert {tuple(split_cases(names, val_fraction=0.2, seed=s)[1]) for s in range(6)} != {tuple(val)}
    assert split_cases(names[:2], val_fraction=0.9)[0]  # one case always trains
    assert split_cases(names[:3], val_fraction=0.01)[1]  # a fraction above 0 validates at least one case
    assert split_cases(names, val_fraction=0.0) == (names, [])
    assert split_cases(names, val_cases=["case_07", "case_01"]) == (
        [n for n in names if n not in ("case_01", "case_07")],
        ["case_01", "case_07"],
    )
    with pytest.raises(ValueError, match="case_99"):
        split_cases(names, val_cases=["case_99"])
    with pytest.raises(ValueError, match="at least one"):
        split_cases(names[:1], val_cases=names[:1])


# --------------------------------------------------------------------------------------------------------- train


def test_train_writes_loadable_best_and_last_bundles_with_a_card_from_the_dataset(
    run: tuple[Path, str], dataset: Path
) -> None:
    output, stdout = run
    _, val_names = split_cases(list(CASES), val_fraction=0.2, seed=0)
    assert len(val_names) == 1
    for name in ("best", "last"):
        bundle = load_bundle(output / name)
        card = bundle.card
        assert card.architecture == "test_unet" and bundle.model.in_channels == 1 and bundle.model.num_classes == 2
        assert card.class_names == ["background", "lesion"] and card.channel_names == ["T1"]
        assert card.normalization["method"] == "zscore" and card.patch_size == [16, 16]
        assert card.spacing == [1.0, 1.0]  # in-plane: the 2D model slices along the coarse 2 mm axis
        assert dataset.name in card.training_data and "4 labelled case(s), 3 for training" in card.training_data
        assert f"1 for validation ({val_names[0]}; validation fraction 0.2, split seed 0)" in card.training_data
    state, _ = read_trainer_state(output / "last")
    assert state["step"] == 3 and state["val_cases"] == val_names
    best_card = load_bundle(output / "best").card
    assert best_card.metrics["step"] == 3 and 0 <= best_card.metrics["mean_dice"] <= 1
    assert f"1 validation case(s): {val_names[0]}" in stdout
    assert f"step 3: validation mean Dice {best_card.metrics['mean_dice']:.4f}" in stdout
    assert f"best bundle: {output / 'best'} (step 3)" in stdout and f"last checkpoint: {output / 'last'}" in stdout


def test_resume_continues_the_saved_run_from_its_step(run: tuple[Path, str], dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "v1"
    shutil.copytree(run[0], output)
    argv = ["train", str(dataset), "-o", str(output), "--resume", "--steps", "5", "--val-every", "5", "-q"]
    assert cli.main([*argv, "--checkpoint-every", "5"]) == 0
    state, _ = read_trainer_state(output / "last")
    assert state["step"] == 5 and state["config"]["steps"] == 5
    assert [entry["step"] for entry in state["history"]] == [3, 5]  # the entry of the first 3 steps was kept
    assert state["train_cases"] == read_trainer_state(run[0] / "last")[0]["train_cases"]


def test_resume_refuses_options_of_a_new_run(run: tuple[Path, str], dataset: Path, capsys) -> None:
    before = _files(run[0])
    assert cli.main(["train", str(dataset), "-o", str(run[0]), "--resume", "--arch", "test_unet", "--seed", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --resume") and "--arch, --seed" in error and "\n" not in error
    assert _files(run[0]) == before


def test_an_existing_run_is_never_replaced_without_resume_or_overwrite(
    run: tuple[Path, str], dataset: Path, capsys
) -> None:
    before = _files(run[0])
    assert cli.main(["train", str(dataset), "-o", str(run[0]), *TINY_RUN, "--steps", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert str(run[0]) in error and "--resume" in error and "--overwrite" in error and "\n" not in error
    assert _files(run[0]) == before


def test_overwrite_replaces_the_run(run: tuple[Path, str], dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "v1"
    shutil.copytree(run[0], output)
    argv = ["train", str(dataset), "-o", str(output), *TINY_RUN, "--steps", "2", "--val-fraction", "0"]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert read_trainer_state(output / "last")[0]["step"] == 2
    assert not (output / "best").exists()  # no validation: the old best bundle is gone, not left to mislead


def test_ctrl_c_stops_after_the_step_and_keeps_the_last_good_checkpoint(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    original = Trainer.train_step

    def step_then_ctrl_c(self: Trainer, batch: dict) -> float:
        loss = original(self, batch)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C in the terminal, during step 2
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup
    output = tmp_path / "run"
    argv = ["train", str(dataset), "-o", str(output), *TINY_RUN, "--steps", "6", "--val-fraction", "0"]
    assert cli.main([*argv, "--checkpoint-every", "1"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 2: the last checkpoint is {output / 'last'} (step 1)" in err
    assert "--resume" in err and "Traceback" not in err
    assert read_trainer_state(output / "last")[0]["step"] == 1  # step 2's checkpoint was never started
    assert signal.getsignal(signal.SIGINT) is handler_before  # the command's handler is removed again


def test_a_missing_dataset_or_unknown_validation_case_is_one_line(dataset: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "Dataset999_Nothing"
    assert cli.main(["train", str(missing), "-o", str(tmp_path / "out"), *TINY_RUN]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {missing}: no such folder") and "\n" not in error
    assert cli.main(["train", str(dataset), "-o", str(tmp_path / "out"), *TINY_RUN, "--val-cases", "BR_404"]) == 2
    error = capsys.readouterr().err.strip()
    assert "BR_404" in error and "BR_001" in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_fine_tuning_a_bundle_with_other_channels_is_refused(dataset: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "two_channels"
    card = ModelCard(class_names=["background", "lesion"], channel_names=["pre", "post"])
    save_bundle(create_model("test_unet", in_channels=2, num_classes=2), bundle, card)
    argv = ["train", str(dataset), "-o", str(tmp_path / "out"), "--from-bundle", str(bundle), "-q"]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "takes 2 input channel(s) (pre, post)" in error and "has 1 (T1)" in error and "\n" not in error


def test_from_bundle_fine_tunes_and_records_the_parent(run: tuple[Path, str], dataset: Path, tmp_path: Path) -> None:
    parent = run[0] / "best"
    output = tmp_path / "tuned"
    argv = ["train", str(dataset), "-o", str(output), "--from-bundle", str(parent), "--steps", "2", "-q"]
    assert (
        cli.main([*argv, "--val-fraction", "0", "--patch-size", "16", "16", "--device", "cpu", "--ema-decay", "0.9"])
        == 0
    )
    state, tensors = read_trainer_state(output / "last")
    assert state["config"]["ema_decay"] == 0.9 and any(k.startswith("training_model.") for k in tensors)
    card = load_bundle(output / "last").card
    parent_card = load_bundle(parent).card
    assert card.parent_bundle == str(parent.resolve()) and card.parent_sha256 == parent_card.sha256
    assert card.class_names == parent_card.class_names and card.normalization == parent_card.normalization
    assert dataset.name in card.training_data and "no validation" in card.training_data


def test_an_invalid_option_value_is_one_line_before_anything_is_written(dataset: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out"
    assert cli.main(["train", str(dataset), "-o", str(output), *TINY_RUN, "--steps", "0"]) == 2
    captured = capsys.readouterr()
    assert "steps must be an integer >= 1" in captured.err and "\n" not in captured.err.strip()
    assert captured.out == "" and not output.exists()
    assert cli.main(["train", str(dataset), "-o", str(output), *TINY_RUN, "--ema-decay", "1"]) == 2
    captured = capsys.readouterr()
    assert "ema_decay must be None or a number in (0, 1)" in captured.err and "\n" not in captured.err.strip()
    assert captured.out == "" and not output.exists()


def test_a_bad_dataset_json_through_the_console_script_gives_no_traceback(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "Dataset043_Broken"
    shutil.copytree(dataset, broken)
    (broken / "dataset.json").write_text('{"channel_names": {"0": "T1"}, "labels": ')
    result = subprocess.run(
        [_script(), "train", str(broken), "-o", str(tmp_path / "out"), "--arch", "test_unet"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken / 'dataset.json'} is not valid JSON")


# ------------------------------------------------------------------------------------------------------ evaluate


def _engine_metrics(bundle: Path, dataset: Path) -> dict[str, tuple[float, float]]:
    """Independently: case -> (lesion Dice, lesion HD95) of the predictor's labels."""
    predictor = Predictor.from_bundle(bundle, PredictionSettings(device="cpu"))
    metrics = {}
    for case in load_nnunet_raw(dataset):
        labels = predictor.predict(case.image, case.spacing).labels
        dice = dice_per_class(labels, case.labels, 2)[1]
        metrics[case.name] = (float(dice), hd95(labels == 1, case.labels == 1, case.spacing))
    return metrics


@pytest.fixture(scope="module")
def expected(run: tuple[Path, str], dataset: Path) -> dict[str, tuple[float, float]]:
    return _engine_metrics(run[0] / "best", dataset)


def _table(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines() if not line.startswith("wrote ")]


def test_evaluate_prints_a_row_per_case_and_the_mean_of_the_engine_dice(
    run: tuple[Path, str], dataset: Path, expected: dict, capsys
) -> None:
    assert cli.main(["evaluate", "--model", str(run[0] / "best"), str(dataset), "--device", "cpu", "-q"]) == 0
    table = _table(capsys.readouterr().out)
    assert table[0] == ["case", "dice_lesion", "mean_dice"]
    assert [row[0] for row in table[1:]] == [*CASES, "mean"]
    for row in table[1:-1]:
        assert float(row[1]) == pytest.approx(expected[row[0]][0], abs=5e-5)
        assert row[2] == row[1]  # one foreground class: the case's mean is its lesion Dice
    mean = float(np.mean([dice for dice, _ in expected.values()]))
    assert float(table[-1][1]) == pytest.approx(mean, abs=5e-5) and float(table[-1][2]) == pytest.approx(mean, abs=5e-5)


def test_evaluate_writes_the_same_table_as_csv_and_refuses_to_overwrite_it(
    run: tuple[Path, str], dataset: Path, expected: dict, tmp_path: Path, capsys
) -> None:
    target = tmp_path / "results" / "metrics.csv"
    argv = ["evaluate", "-m", str(run[0] / "best"), str(dataset), "--cases", "BR_002", "BR_004", "--hd95", "-q"]
    assert cli.main([*argv, "--csv", str(target)]) == 0
    printed = _table(capsys.readouterr().out)
    with open(target, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == printed[0] == ["case", "dice_lesion", "mean_dice", "hd95_lesion"]
    assert [row[0] for row in rows[1:]] == ["BR_002", "BR_004", "mean"]
    for row, shown in zip(rows[1:], printed[1:], strict=True):
        assert float(shown[1]) == pytest.approx(float(row[1]), abs=5e-5)
        assert float(shown[3]) == pytest.approx(float(row[3]), abs=5e-3) or math.isinf(float(row[3]))
    for row in rows[1:-1]:
        dice, distance = expected[row[0]]
        assert float(row[1]) == pytest.approx(dice, abs=1e-12)
        assert float(row[3]) == pytest.approx(distance, abs=1e-9) or (
            math.isinf(distance) and math.isinf(float(row[3]))
        )
    picked = [expected[name] for name in ("BR_002", "BR_004")]
    assert float(rows[-1][1]) == pytest.approx(np.mean([d for d, _ in picked]), abs=1e-12)

    before = target.read_bytes()
    assert cli.main([*argv, "--csv", str(target)]) == 2
    error = capsys.readouterr().err.strip()
    assert str(target) in error and "--overwrite" in error and "\n" not in error
    assert target.read_bytes() == before
    assert cli.main([*argv, "--csv", str(target), "--overwrite"]) == 0
    assert target.read_bytes() == before  # same numbers again
    assert [p.name for p in target.parent.iterdir()] == ["metrics.csv"]  # no temporary file left


def test_evaluate_refuses_a_dataset_with_other_classes(run: tuple[Path, str], dataset: Path, tmp_path: Path, capsys):
    other = tmp_path / "Dataset044_ThreeClasses"
    shutil.copytree(dataset, other)
    info = json.loads((other / "dataset.json").read_text())
    info["labels"]["cyst"] = 2
    (other / "dataset.json").write_text(json.dumps(info))
    assert cli.main(["evaluate", "-m", str(run[0] / "best"), str(other), "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert "predicts 2 classes" in error and "has 3" in error and "\n" not in error
