"""The training loop: a step lowers the loss, resume equals an uninterrupted run, cancellation keeps the last good
checkpoint, validation Dice, early stopping, bundles, and the CPU oneDNN guard."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading

import numpy as np
import pytest
import torch
from training_cases import cpu_config, synthetic_case

from napari_mamba_seg.bundles import ModelCard, load_bundle, save_bundle
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.models import create_model
from napari_mamba_seg.training import (
    AugmentationConfig,
    DiceCELoss,
    Trainer,
    TrainingConfig,
    read_trainer_state,
)
from napari_mamba_seg.training.trainer import step_seed

CARD = ModelCard(class_names=["background", "breast", "lesion"], normalization={"method": "zscore"})


def _cases(n: int = 2, **kwargs):
    return [synthetic_case(f"case{i}", seed=i, **kwargs) for i in range(n)]


def _hashes(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def _leftovers(output_dir):
    return sorted(path.name for path in output_dir.iterdir() if path.name.startswith("."))


@pytest.mark.parametrize(
    ("name", "patch", "case_shape"),
    [
        ("test_unet", (32, 32), (6, 40, 40)),
        # slow only because of a CPU-contention problem of the numba scan on 2 busy cores (see the report)
        pytest.param("test_vm_unet", (32, 32), (6, 40, 40), marks=pytest.mark.slow),
        ("test_unet_3d", (16, 16, 16), (20, 20, 20)),
    ],
)
def test_one_optimizer_step_decreases_the_loss_on_a_fixed_batch(name, patch, case_shape):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=3)
    cases = _cases(1, shape=case_shape, spacing=None)
    trainer = Trainer(model, CARD, cases, config=cpu_config(patch_size=patch, lr=1e-3, grad_clip=None))
    batch = torch.utils.data.default_collate([trainer.dataset[i] for i in range(2)])
    loss_fn = DiceCELoss()

    def loss_now():  # the function the step descends: train mode, the step's random seed (stochastic depth)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(step_seed(0, 0))
            model.train()
            return loss_fn(model(batch["image"]), batch["labels"], batch["trusted"]).item()

    before = loss_now()
    reported = trainer.train_step(batch)
    after = loss_now()
    assert reported == pytest.approx(before, rel=1e-5)
    assert after < before
    assert trainer.step == 1


def _model(name: str = "test_unet", num_classes: int = 3):
    torch.manual_seed(0)  # the same initial weights every time
    return create_model(name, in_channels=1, num_classes=num_classes)


def _run_to_completion(output_dir, cases, config, *, snapshot_at=None, name="test_unet"):
    trainer = Trainer(_model(name), CARD, cases, None, config, output_dir)
    snapshots = {}

    def progress(update):
        if update.stage == "train" and update.step == snapshot_at:
            snapshots["optimizer"] = copy.deepcopy(trainer.optimizer.state_dict())
        if update.stage == "train" and update.step == (snapshot_at or 0) + 1:
            snapshots["next_lr"] = update.lr

    return trainer.train(progress=progress), snapshots


@pytest.mark.parametrize(
    ("name", "steps"),
    [("test_unet", 6), ("test_mlla_unet", 4)],  # mlla: stochastic depth
)
def test_resume_continues_from_the_saved_step_like_an_uninterrupted_run(tmp_path, name, steps):
    cases = _cases()
    half = steps // 2
    config = cpu_config(steps=steps, checkpoint_every=half, warmup_steps=2, augmentation=AugmentationConfig())
    straight, snapshots = _run_to_completion(tmp_path / "straight", cases, config, snapshot_at=half, name=name)

    first = Trainer(_model(name), CARD, cases, None, config, tmp_path / "cut")
    stop = threading.Event()
    interrupted = first.train(
        progress=lambda p: stop.set() if p.stage == "checkpoint" and p.step == half else None, cancel=stop
    )
    assert interrupted.cancelled and interrupted.step == half

    resumed = Trainer.resume(tmp_path / "cut", cases)
    assert resumed.step == half
    expected_state = snapshots["optimizer"]["state"]
    actual_state = resumed.optimizer.state_dict()["state"]
    assert set(actual_state) == set(expected_state)
    for index, values in expected_state.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(actual_state[index][key], values[key]), (index, key)
    lrs = []
    result = resumed.train(progress=lambda p: lrs.append(p.lr) if p.stage == "train" else None)
    assert result.steps_run == steps - half and result.step == steps and not result.cancelled
    assert lrs[0] == snapshots["next_lr"]
    for (name, a), b in zip(straight.model.state_dict().items(), result.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    strip = [{k: v for k, v in entry.items() if k != "time"} for entry in straight.history]
    assert [{k: v for k, v in entry.items() if k != "time"} for entry in result.history] == strip
    state, _ = read_trainer_state(tmp_path / "cut" / "last")
    assert state["step"] == steps


def test_cancel_stops_within_a_step_and_leaves_the_last_good_checkpoint_untouched(tmp_path):
    output = tmp_path / "run"
    trainer = Trainer(
        create_model("test_unet", in_channels=1, num_classes=3),
        CARD,
        _cases(),
        None,
        cpu_config(steps=8, checkpoint_every=2),
        output,
    )
    cancel = threading.Event()
    seen = []
    hashes = {}

    def progress(update):
        seen.append((update.stage, update.step))
        if update.stage == "checkpoint" and update.step == 2:
            hashes["before"] = _hashes(output / "last")
        if update.stage == "train" and update.step == 3:
            cancel.set()

    result = trainer.train(progress=progress, cancel=cancel)
    assert result.cancelled and result.step == 3 and result.steps_run == 3
    assert max(step for _, step in seen) == 3
    assert _hashes(output / "last") == hashes["before"]
    assert _leftovers(output) == []
    assert load_bundle(output / "last").card.metrics["step"] == 2
    assert read_trainer_state(output / "last")[0]["step"] == 2
    assert result.last_checkpoint == output / "last"

    # closing the generator is a cancel too; a resumed run continues from step 2
    resumed = Trainer.resume(output, _cases())
    steps = resumed.iter_train()
    for update in steps:
        if update.stage == "train" and update.step == 3:
            steps.close()
    assert _hashes(output / "last") == hashes["before"] and _leftovers(output) == []


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    from napari_mamba_seg.training import checkpoint

    output = tmp_path / "run"
    trainer = Trainer(
        create_model("test_unet", in_channels=1, num_classes=3),
        CARD,
        _cases(),
        None,
        cpu_config(steps=4, checkpoint_every=2),
        output,
    )
    steps = trainer.iter_train()
    while (update := next(steps)).stage != "checkpoint":
        pass
    before = _hashes(output / "last")
    write = checkpoint.write_durably

    def failing_write(path, data):
        if path.name == checkpoint.STATE_JSON:
            raise OSError("disk full")
        write(path, data)

    monkeypatch.setattr(checkpoint, "write_durably", failing_write)
    with pytest.raises(OSError, match="disk full"):
        for update in steps:  # noqa: B007 (the last update is checked below)
            pass
    assert update.step == 4  # the step-4 checkpoint failed
    assert _hashes(output / "last") == before and _leftovers(output) == []


def test_validation_dice_early_stopping_and_the_best_bundle(tmp_path):
    val = synthetic_case("val", seed=9)
    trusted = np.ones(val.labels.shape, bool)
    trusted[:, :, :10] = False
    val.trusted = trusted
    output = tmp_path / "run"
    config = cpu_config(
        steps=20, val_every=1, checkpoint_every=0, lr=1e-9, early_stopping_patience=2, early_stopping_min_delta=0.5
    )
    trainer = Trainer(_model(), CARD, _cases(), [val], config, output)
    validations = []
    result = trainer.train(progress=lambda p: validations.append(p.metrics) if p.metrics else None)
    # the first validation is the best; two more without an improvement of 0.5 stop the run
    assert result.stopped_early and result.step == 3 and len(validations) == 3 and len(result.history) == 3
    assert result.best_metrics["step"] == 1
    assert load_bundle(output / "last").card.metrics["step"] == 3

    predictor = Predictor.from_bundle(output / "best", PredictionSettings(device="cpu"))
    assert predictor.card.metrics["mean_dice"] == pytest.approx(validations[0]["mean_dice"])
    labels = predictor.predict(val.image, val.spacing).labels
    keep = val.trusted
    expected = []
    for k in (1, 2):
        p, t = (labels == k)[keep], (val.labels == k)[keep]
        expected.append(2 * np.sum(p & t) / (p.sum() + t.sum()))
    assert validations[0]["dice_breast"] == pytest.approx(expected[0])
    assert validations[0]["dice_lesion"] == pytest.approx(expected[1])
    assert validations[0]["mean_dice"] == pytest.approx(np.mean(expected))
    card = json.loads((output / "best" / "card.json").read_text())
    assert card["patch_size"] == [32, 32] and card["class_names"] == CARD.class_names
    assert "2 training case(s)" in card["training_data"]


def test_training_runs_on_the_cpu_with_onednn_off_and_restores_the_flag():
    model = create_model("test_unet", in_channels=1, num_classes=3)
    flags = []
    model.register_forward_hook(lambda *_: flags.append(torch.backends.mkldnn.enabled))
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = True
    try:
        for onednn in (False, True):
            flags.clear()
            config = cpu_config(steps=1, val_every=1, cpu_onednn=onednn)
            trainer = Trainer(model, CARD, _cases(1), _cases(1), config)
            between = [torch.backends.mkldnn.enabled for _ in trainer.iter_train()]
            assert between and all(between)  # never held across a yield
            assert len(flags) > 1 and all(flag == onednn for flag in flags)  # training and validation forwards
    finally:
        torch.backends.mkldnn.enabled = previous


def test_fine_tuning_from_a_bundle_records_the_parent(tmp_path):
    parent = create_model("test_unet", in_channels=1, num_classes=3)
    card = save_bundle(parent, tmp_path / "parent", ModelCard(class_names=CARD.class_names, patch_size=[32, 32]))
    config = cpu_config(steps=2, patch_size=None)
    trainer = Trainer.from_bundle(tmp_path / "parent", _cases(), config=config, output_dir=tmp_path / "tuned")
    result = trainer.train()
    tuned = load_bundle(result.last_checkpoint)
    assert tuned.card.parent_sha256 == card.sha256 and tuned.card.parent_bundle == str((tmp_path / "parent").resolve())
    assert tuned.card.class_names == CARD.class_names and tuned.card.patch_size == [32, 32]
    assert tuned.card.sha256 != card.sha256


def test_an_existing_run_is_not_overwritten_and_resume_checks_its_inputs(tmp_path):
    output = tmp_path / "run"
    model = create_model("test_unet", in_channels=1, num_classes=3)
    Trainer(model, CARD, _cases(), None, cpu_config(steps=1), output).train()
    with pytest.raises(FileExistsError, match=r"Trainer\.resume"):
        Trainer(model, CARD, _cases(), None, cpu_config(steps=1), output)
    fresh = Trainer(model, CARD, _cases(), None, cpu_config(steps=1), output, overwrite=True)
    assert not (output / "last").exists()  # the old run is gone once a new one is asked for explicitly
    fresh.train()
    with pytest.raises(ValueError, match="training cases differ"):
        Trainer.resume(output, _cases(3))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        Trainer.resume(tmp_path / "empty", _cases())
    with pytest.raises(FileNotFoundError, match="no trainer state"):
        read_trainer_state(tmp_path / "run" / "missing")


def test_data_loading_workers_give_the_same_training(tmp_path):
    weights = []
    for workers in (0, 1):
        torch.manual_seed(0)
        model = create_model("test_unet", in_channels=1, num_classes=3)
        config = cpu_config(steps=2, num_workers=workers, augmentation=AugmentationConfig())
        weights.append(Trainer(model, CARD, _cases(), config=config).train().model.state_dict())
    for a, b in zip(weights[0].values(), weights[1].values(), strict=True):
        assert torch.equal(a, b)


def test_config_round_trips_and_bad_values_are_named():
    config = TrainingConfig(steps=10, patch_size=(16, 16, 16), augmentation=AugmentationConfig(gamma_probability=0))
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1.*warmup_steps"):
        TrainingConfig(steps=0, warmup_steps=5)
    with pytest.raises(ValueError, match="unknown TrainingConfig field"):
        TrainingConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match="patch_size"):
        Trainer(create_model("test_unet", num_classes=3), CARD, _cases(), config=cpu_config(patch_size=(8, 8, 8)))
    with pytest.raises(ValueError, match="class names"):
        Trainer(create_model("test_unet", num_classes=2), CARD, _cases(), config=cpu_config())


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_lowers_the_loss_and_resumes(tmp_path, precision):
    torch.manual_seed(0)
    model = create_model("test_unet", in_channels=1, num_classes=3)
    config = cpu_config(steps=12, device="cuda", precision=precision, checkpoint_every=6, lr=3e-3)
    trainer = Trainer(model, CARD, _cases(), _cases(1), config, tmp_path / "run")
    assert (trainer.scaler.is_enabled()) == (precision == "fp16")
    losses = []
    stop = threading.Event()
    result = trainer.train(
        progress=lambda p: (
            losses.append(p.loss) if p.stage == "train" else None,
            stop.set() if p.step == 6 and p.stage == "checkpoint" else None,
        ),
        cancel=stop,
    )
    assert result.cancelled and result.step == 6
    resumed = Trainer.resume(tmp_path / "run", _cases(), _cases(1))
    assert next(iter(resumed.model.parameters())).device.type == "cuda"
    result = resumed.train(progress=lambda p: losses.append(p.loss) if p.stage == "train" else None)
    assert result.step == 12 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert 0 <= result.best_metrics["mean_dice"] <= 1


def test_a_checkpoint_moved_aside_by_a_crash_between_the_renames_is_recovered(tmp_path):
    output = tmp_path / "run"
    Trainer(_model(), CARD, _cases(), None, cpu_config(steps=2, checkpoint_every=1), output).train()
    (output / "last").rename(output / ".last.0badc0de.old")  # the state right after the first rename
    (output / ".last.1badc0de.partial").mkdir()  # and a staging folder a crash left behind
    resumed = Trainer.resume(output, _cases())
    assert resumed.step == 2 and _leftovers(output) == []


def test_evaluate_reports_per_case_dice_and_hd95_of_the_predictions():
    from napari_mamba_seg.training import dice_per_class, evaluate, hd95

    cases = _cases(2)
    predictor = Predictor(_model(), dataclasses.replace(CARD, patch_size=[32, 32]), PredictionSettings(device="cpu"))
    reported = []
    result = evaluate(predictor, cases, compute_hd95=True, progress=reported.append)
    assert [r.name for r in reported] == ["case0", "case1"]
    for case, evaluation in zip(cases, result.cases, strict=True):
        labels = predictor.predict(case.image, case.spacing).labels
        np.testing.assert_array_equal(evaluation.dice, dice_per_class(labels, case.labels, 3))
        assert evaluation.hd95[2] == hd95(labels == 2, case.labels == 2, case.spacing)
    assert result.metrics["dice_lesion"] == pytest.approx(np.nanmean([r.dice[2] for r in result.cases]))
    assert set(result.metrics) == {"dice_breast", "dice_lesion", "mean_dice", "hd95_breast", "hd95_lesion"}
