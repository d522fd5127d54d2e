"""The moving average of the weights (``TrainingConfig.ema_decay``): the update against a float64 rewrite, and the
trainer validating, saving, returning and resuming the average."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from torch import nn
from training_cases import cpu_config, synthetic_case

from napari_mamba_seg.bundles import ModelCard, load_bundle
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.models import create_model
from napari_mamba_seg.training import Trainer, TrainingConfig, read_trainer_state
from napari_mamba_seg.training.ema import ema_decay_at, make_ema_model, update_ema
from napari_mamba_seg.training.evaluation import case_metrics, summarize

CARD = ModelCard(class_names=["background", "breast", "lesion"], normalization={"method": "zscore"})


def _cases(n: int = 2):
    return [synthetic_case(f"case{i}", seed=i) for i in range(n)]


def _model():
    torch.manual_seed(0)
    return create_model("test_unet", in_channels=1, num_classes=3)


def _float64_average(snapshots: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The average of the weights after each step, written as the formula: ``snapshots[0]`` are the initial ones."""
    average = {k: v.double().clone() for k, v in snapshots[0].items()}
    for step, weights in enumerate(snapshots[1:], start=1):
        d = min(decay, (1 + step) / (10 + step))
        for name, value in weights.items():
            average[name] = d * average[name] + (1 - d) * value.double()
    return average


def test_ema_decay_warms_up_then_holds():
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.999, 10**6) == 0.999
    decays = [ema_decay_at(0.99, s) for s in range(1, 2000)]
    assert all(a <= b for a, b in itertools.pairwise(decays)) and decays[-1] == 0.99


def test_update_moves_parameters_and_copies_buffers_like_the_formula():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    average = make_ema_model(model)
    assert not any(p.requires_grad for p in average.parameters()) and not average.training
    expected = {k: v.double().clone() for k, v in model.named_parameters()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(3, 2, 8, 8))  # moves the BatchNorm statistics
        decay = ema_decay_at(0.9, step)
        update_ema(average, model, decay)
        for name, value in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * value.detach().double()
    for name, value in average.named_parameters():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6, msg=name)
        assert not torch.equal(value, dict(model.named_parameters())[name])
    for (name, a), b in zip(average.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="not a copy"):
        update_ema(average, nn.Linear(2, 2), 0.5)


def test_the_trainer_validates_saves_and_returns_the_average(tmp_path):
    val = synthetic_case("val", seed=9)
    steps = 5
    config = cpu_config(steps=steps, val_every=steps, checkpoint_every=steps, lr=3e-3, ema_decay=0.95)
    trainer = Trainer(_model(), CARD, _cases(), [val], config, tmp_path / "run")
    snapshots = [{k: v.detach().clone() for k, v in trainer.model.named_parameters()}]
    metrics = {}

    def progress(update):
        if update.stage == "train":
            snapshots.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
        if update.metrics:
            metrics.update(update.metrics)

    result = trainer.train(progress=progress)
    expected = _float64_average(snapshots, 0.95)
    trained = dict(trainer.model.named_parameters())
    for name, value in result.model.named_parameters():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert result.model is not trainer.model
    assert any(not torch.equal(value, trained[name]) for name, value in result.model.named_parameters())

    # both bundles hold the average; the trained weights ride in last/'s trainer state
    for folder in ("best", "last"):
        saved = load_bundle(tmp_path / "run" / folder).model.state_dict()
        for name, value in result.model.state_dict().items():
            assert torch.equal(saved[name], value.cpu()), (folder, name)
    _, tensors = read_trainer_state(tmp_path / "run" / "last")
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(tensors[f"training_model.{name}"], value.cpu()), name

    # the validation Dice is the average's (recomputed from the saved bundle), not the trained weights'
    def mean_dice(model):
        predictor = Predictor(model, trainer.card, PredictionSettings(device="cpu", overlap=config.validation_overlap))
        labels = predictor.predict(val.image, val.spacing).labels
        return summarize([case_metrics(labels, val, 3)], CARD.class_names)["mean_dice"]

    assert metrics["mean_dice"] == pytest.approx(mean_dice(load_bundle(tmp_path / "run" / "best").model))
    assert abs(metrics["mean_dice"] - mean_dice(trainer.model)) > 1e-3
    assert result.best_metrics["mean_dice"] == pytest.approx(metrics["mean_dice"])


def test_a_resumed_run_continues_the_trained_weights_and_the_average(tmp_path):
    cases = _cases()
    config = cpu_config(steps=6, checkpoint_every=3, lr=3e-3, ema_decay=0.9)
    straight = Trainer(_model(), CARD, cases, None, config, tmp_path / "straight")
    straight_result = straight.train()

    first = Trainer(_model(), CARD, cases, None, config, tmp_path / "cut")
    stop = threading.Event()
    first.train(progress=lambda p: stop.set() if p.stage == "checkpoint" and p.step == 3 else None, cancel=stop)
    resumed = Trainer.resume(tmp_path / "cut", cases)
    assert resumed.step == 3
    result = resumed.train()
    for a, b in ((straight.model, resumed.model), (straight_result.model, result.model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_without_ema_the_model_is_the_trained_one_and_bad_decays_are_named(tmp_path):
    trainer = Trainer(_model(), CARD, _cases(), None, cpu_config(steps=2), tmp_path / "run")
    result = trainer.train()
    assert trainer.ema_model is None and result.model is trainer.model
    _, tensors = read_trainer_state(tmp_path / "run" / "last")
    assert not [k for k in tensors if k.startswith("training_model.")]
    for bad in (0, 1, 1.5, -0.1, "0.9", float("nan")):
        with pytest.raises(ValueError, match="ema_decay must be None or a number in"):
            TrainingConfig(ema_decay=bad)
    assert np.isclose(TrainingConfig(ema_decay=0.999).ema_decay, 0.999)
