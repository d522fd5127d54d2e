"""The bundled models of weights/ and their recipes (scripts/bundled_models.py).

The recipes are run here at a tiny budget (2 steps on small phantoms), so a change that breaks the documented
reproduction commands fails CI; the shipped weights are checked on inputs they were not trained on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mamba_seg.bundles import list_bundled, load_bundle, read_card
from napari_mamba_seg.data import make_phantom
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.training.metrics import dice_per_class

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bundled_models.py"
SMALL_PHANTOM = (16, 160, 160)


@pytest.fixture(scope="module")
def recipes():
    spec = importlib.util.spec_from_file_location("bundled_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_both_bundled_models_are_shipped_small_and_load() -> None:
    assert {"breast-dce", "mr-tumour"} <= set(list_bundled())
    for name in ("breast-dce", "mr-tumour"):
        bundle = load_bundle(name)  # checks the sha256 of the weights against the card
        assert bundle.card.metrics, f"{name}: the card carries no metrics"
        size = sum(f.stat().st_size for f in bundle.folder.iterdir())
        assert size < 25 * 2**20


def test_cards_say_what_the_issue_asks_for() -> None:
    breast = read_card("breast-dce")
    assert breast.in_channels == 3 and breast.class_names == ["background", "breast", "fibroglandular tissue", "lesion"]
    for key in (
        "val_dice_breast",
        "val_dice_fibroglandular tissue",
        "val_dice_lesion",
        "real_breast_voi_recall",
        "real_lesion_dice_vs_pe70",
    ):
        assert 0 <= breast.metrics[key] <= 1, key
    tumour = read_card("mr-tumour")
    assert tumour.in_channels == 1 and tumour.class_names == ["background", "tumour"]
    assert 0 <= tumour.metrics["val_mean_dice"] <= 1
    assert 0 <= tumour.metrics["baseline_unet_val_mean_dice"] <= 1


def test_the_breast_model_segments_a_phantom_it_never_saw(recipes) -> None:
    seed = 20_000  # training used seeds 0-63, validation 10000-10007
    settings = recipes.phantom_settings(seed) | {"lesions": 1, "fat_suppression": True}
    phantom = make_phantom(**settings)
    predictor = Predictor.from_bundle("breast-dce", PredictionSettings(device="cpu"))
    labels = predictor.predict(phantom.image, phantom.spacing).labels
    dice = dice_per_class(labels, recipes.PHANTOM_TO_BREAST_CLASS[phantom.labels], 4)
    assert dice[1] > 0.6 and dice[2] > 0.5, f"Dice per class {np.round(dice, 3)}"


def test_the_tumour_model_segments_a_validation_case(shared_data) -> None:
    card = read_card("mr-tumour")
    case_name = "STS_033"
    assert case_name in card.training_data.split("validation cases:")[1]  # never trained on
    from napari_mamba_seg.io import read_image

    image = read_image(shared_data / "ibsi_sarcoma_mr" / case_name / "image.nii.gz")
    mask = read_image(shared_data / "ibsi_sarcoma_mr" / case_name / "mask.nii.gz").array[0]
    labels = Predictor.from_bundle("mr-tumour", PredictionSettings(device="cpu")).predict(image).labels
    assert dice_per_class(labels, mask, 2)[1] > 0.8


def test_phantom_settings_are_reproducible_and_varied(recipes) -> None:
    assert recipes.phantom_settings(5) == recipes.phantom_settings(5)
    drawn = [recipes.phantom_settings(seed) for seed in range(40)]
    assert {d["density"] for d in drawn} == {"a", "b", "c", "d"}
    assert {d["fat_suppression"] for d in drawn} == {True, False}
    assert {d["field_strength"] for d in drawn} == {1.5, 3.0}
    assert len({d["noise"] for d in drawn}) == 40


def test_a_phantom_case_maps_muscle_to_background(recipes) -> None:
    case = recipes.phantom_case(3, SMALL_PHANTOM)
    phantom = make_phantom(shape=SMALL_PHANTOM, **recipes.phantom_settings(3))
    np.testing.assert_array_equal(case.image, phantom.image)
    assert (phantom.labels == 4).any()
    np.testing.assert_array_equal(case.labels, np.where(phantom.labels == 4, 0, phantom.labels))
    assert case.spacing == phantom.spacing


def _tiny(recipes, **changes):
    recipe = dataclasses.replace(
        recipes.RECIPES["breast-dce"],
        arch="test_ultralight_vm_unet",
        steps=2,
        val_every=2,
        batch_size=2,
        patch_size=(64, 64),
        **changes,
    )
    train = recipes.phantom_cases([0, 1], SMALL_PHANTOM)
    val = recipes.phantom_cases([10_000], SMALL_PHANTOM)
    return recipe, train, val


def test_train_then_publish_completes_the_card(recipes, tmp_path) -> None:
    recipe, train, val = _tiny(recipes)
    summary = recipes.train(recipe, train, val, tmp_path / "run", device="cpu", quiet=True)
    assert summary["train_cases"] == ["phantom_0000", "phantom_0001"]
    assert summary["val_cases"] == ["phantom_10000"]
    assert summary["best_metrics"]["step"] == 2
    with pytest.raises(SystemExit, match="already holds a run"):
        recipes.train(recipe, train, val, tmp_path / "run", device="cpu", quiet=True)

    real = tmp_path / "real.json"
    real.write_text(json.dumps({"real_breast_voi_recall": 0.5}))
    weights = tmp_path / "weights"
    folder = recipes.publish("breast-dce", tmp_path / "run", real=real, target_root=weights)
    card = load_bundle(folder).card
    assert card.metrics["real_breast_voi_recall"] == 0.5
    assert card.metrics["val_mean_dice"] == pytest.approx(summary["best_metrics"]["mean_dice"])
    assert card.metrics["best_step"] == 2 and card.metrics["val_cases"] == 1
    assert "phantom_10000" in card.training_data
    with pytest.raises(FileExistsError):
        recipes.publish("breast-dce", tmp_path / "run", target_root=weights)


def test_a_variant_with_a_moving_average_publishes_its_last_step(recipes, tmp_path) -> None:
    base = recipes.RECIPES["mr-tumour"]
    variant = recipes.recipe_with(base, ["ema_decay=0.999", "lr=3e-4", "patch_size=[160, 160]"])
    assert (variant.ema_decay, variant.lr, variant.patch_size) == (0.999, 3e-4, (160, 160))
    assert dataclasses.replace(variant, ema_decay=None, lr=base.lr, patch_size=base.patch_size) == base
    for bad, message in (("ema=0.9", "FIELD one of"), ("lr", "FIELD=VALUE"), ("lr=fast", "not JSON")):
        with pytest.raises(SystemExit, match=message):
            recipes.recipe_with(base, [bad])

    recipe, train, val = _tiny(recipes, ema_decay=0.9)
    recipe = dataclasses.replace(recipe, steps=3, val_every=1)
    summary = recipes.train(recipe, train, val, tmp_path / "model", device="cpu", quiet=True)
    base_summary = recipes.train(recipe, train, val, tmp_path / "baseline", device="cpu", quiet=True)
    assert summary["recipe"]["ema_decay"] == 0.9
    folder = recipes.publish(
        "breast-dce", tmp_path / "model", baseline=tmp_path / "baseline", target_root=tmp_path / "w", which="last"
    )
    bundle = load_bundle(folder)
    last = load_bundle(tmp_path / "model" / "last")
    for name, value in last.model.state_dict().items():  # the weights of the end of the run (the average)
        assert torch.equal(bundle.model.state_dict()[name], value), name
    final = [entry for entry in summary["history"] if "mean_dice" in entry][-1]
    assert bundle.card.metrics["last_step"] == 3 and "best_step" not in bundle.card.metrics
    assert bundle.card.metrics["val_mean_dice"] == pytest.approx(final["mean_dice"])
    assert bundle.card.metrics["best_step_val_mean_dice"] == pytest.approx(summary["best_metrics"]["mean_dice"])
    base_final = [entry for entry in base_summary["history"] if "mean_dice" in entry][-1]
    assert bundle.card.metrics["baseline_test_ultralight_vm_unet_val_mean_dice"] == base_final["mean_dice"]


def test_a_recipe_trains_the_same_weights_twice_in_one_process(recipes, tmp_path) -> None:
    """The initial weights follow the recipe's seed, not whatever used torch's RNG before (here: the first run)."""
    recipe, train, val = _tiny(recipes)
    weights = []
    for run in ("first", "second"):
        recipes.train(recipe, train, val, tmp_path / run, device="cpu", quiet=True)
        weights.append(load_bundle(tmp_path / run / "last").model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    other = dataclasses.replace(recipe, seed=1)
    recipes.train(other, train, val, tmp_path / "other seed", device="cpu", quiet=True)
    assert not torch.equal(load_bundle(tmp_path / "other seed" / "last").model.state_dict()[name], weights[0][name])


def test_a_baseline_with_another_split_is_refused(recipes, tmp_path) -> None:
    recipe, train, val = _tiny(recipes)
    recipes.train(recipe, train, val, tmp_path / "model", device="cpu", quiet=True)
    recipes.train(recipe, train[:1], val + train[1:], tmp_path / "baseline", device="cpu", quiet=True)
    with pytest.raises(SystemExit, match="another validation split"):
        recipes.publish("breast-dce", tmp_path / "model", baseline=tmp_path / "baseline", target_root=tmp_path / "w")


def test_real_breast_metrics_of_the_bundled_model(recipes, shared_data, tmp_path) -> None:
    case = shared_data / "breast_nact" / "UCSF-BR-06"
    metrics, image, labels = recipes.real_breast_metrics("breast-dce", case)
    assert labels.shape == image.array.shape[1:]
    assert metrics == pytest.approx(
        {k: v for k, v in read_card("breast-dce").metrics.items() if k.startswith("real_")}, abs=0.02
    )  # the card's numbers come from this very computation
    from napari_mamba_seg.io import read_image

    voi = read_image(case / "breast_voi_mask.nii.gz").array[0] > 0
    tumour = read_image(case / "tumour_pe70_mask.nii.gz").array[0] > 0
    picture = recipes.overlay_picture(image, labels, voi, tumour, tmp_path / "overlay.png")
    from PIL import Image

    plane = np.take(labels, 0, axis=int(np.argmax(image.geometry.spacing)))
    with Image.open(picture) as png:
        assert png.size == (3 * 2 * plane.shape[1], 2 * plane.shape[0] + 28)
