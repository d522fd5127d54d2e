"""Train, evaluate and publish the bundled models of ``weights/`` (the recipes behind ``weights/README.md``).

Each bundled model is reproduced by the commands below (fixed seeds; GPU runs are not bit-exact across machines, so
expect the metrics to move in the second decimal)::

    # mr-tumour: U-Mamba-Bot (small) on the ibsi_sarcoma_mr development cases, and its U-Net baseline (same budget)
    python scripts/bundled_models.py train mr-tumour --data ../shared/data/ibsi_sarcoma_mr --out runs/mr-tumour
    python scripts/bundled_models.py train mr-tumour-unet --data ../shared/data/ibsi_sarcoma_mr --out runs/mr-unet

    # breast-dce: UltraLight VM-UNet on synthetic phantoms (napari_mamba_seg.data)
    python scripts/bundled_models.py train breast-dce --out runs/breast-dce
    python scripts/bundled_models.py real-breast --model runs/breast-dce/best \\
        --data ../shared/data/breast_nact/UCSF-BR-06 --picture docs/breast-dce-ucsf-br-06.png --json runs/real.json

    # copy a run's best bundle into weights/ with its card completed
    python scripts/bundled_models.py publish mr-tumour --run runs/mr-tumour --baseline runs/mr-unet
    python scripts/bundled_models.py publish breast-dce --run runs/breast-dce --real runs/real.json

``train`` writes ``<out>/best`` (the bundle of the best validation step), ``<out>/last`` and ``<out>/summary.json``
(recipe, split, best and final validation metrics, steps per second). Nothing is overwritten without
``--overwrite``. The recipes are plain :class:`Recipe` values: read them below. ``train --set FIELD=VALUE`` runs a
variant (e.g. ``--set ema_decay=0.999``), and ``publish --bundle last`` publishes the end of a run instead of its
best validation step (a choice made on the split that then reports the Dice).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BREAST_CLASSES = ["background", "breast", "fibroglandular tissue", "lesion"]
PHANTOM_TO_BREAST_CLASS = np.array([0, 1, 2, 3, 0], dtype=np.uint8)
"""Phantom label (0 background, 1 breast fat, 2 FGT, 3 lesion, 4 muscle) -> class of the breast model (muscle is
background: the model segments the breast)."""
SARCOMA_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Recipe:
    """How one bundled model is trained.

    Attributes:
        arch: Registered architecture.
        overrides: Config fields of the architecture (the small variants that fit in 25 MB).
        data: ``"sarcoma"`` (cases of ibsi_sarcoma_mr) or ``"phantoms"``.
        steps: Optimizer steps.
        batch_size: Patches per step.
        patch_size: 2D patch size.
        lr: Peak learning rate.
        seed: Seed of the split, the patches, the augmentation and the phantoms.
        val_every: Validate every this many steps.
        ema_decay: Validate and save a moving average of the weights with this decay (``TrainingConfig.ema_decay``);
            None = the weights of each step.
        phantoms_train: Phantoms to train on (``data="phantoms"``).
        phantoms_val: Held-back phantoms (validation and the card's phantom metrics).
        modality: The card's modality.
        license: Licence of the weights (that of the training data).
        training_data: The card's training-data text.
        description: The card's description.
    """

    arch: str
    overrides: dict[str, Any]
    data: str
    steps: int
    batch_size: int
    patch_size: tuple[int, int]
    lr: float = 1e-3
    seed: int = 0
    val_every: int = 500
    ema_decay: float | None = None
    phantoms_train: int = 0
    phantoms_val: int = 0
    modality: str = ""
    license: str = ""
    training_data: str = ""
    description: str = ""
    class_names: list[str] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)


_SARCOMA_TEXT = (
    "ibsi_sarcoma_mr development cases (IBSI validation set of TCIA Soft-tissue-Sarcoma, Vallières et al. 2015, "
    "CC BY 3.0): T1-weighted MR, N4-corrected and fat-normalised by IBSI, cropped 5 cm around the GTV_Mass contour; "
    f"{round(100 * SARCOMA_VAL_FRACTION)} % of the 34 cases held out for validation (seed 0); 2D slices along the "
    "3.27 mm axis"
)
_SARCOMA_LICENSE = "CC-BY-3.0 (training data: TCIA Soft-tissue-Sarcoma via IBSI)"

_SARCOMA_BUDGET: dict[str, Any] = {
    "data": "sarcoma",
    "steps": 8000,
    "batch_size": 16,
    "patch_size": (192, 192),
    "modality": "MR, T1-weighted (extremity soft-tissue sarcoma, cropped around the tumour)",
    "license": _SARCOMA_LICENSE,
    "training_data": _SARCOMA_TEXT,
    "class_names": ["background", "tumour"],
    "channel_names": ["T1"],
}
"""What mr-tumour and its U-Net baseline share: data, split, budget and card texts."""

RECIPES: dict[str, Recipe] = {
    "mr-tumour": Recipe(
        arch="umamba_bot",
        overrides={"features": (16, 32, 64, 128, 256), "strides": (1, 2, 2, 2, 2)},
        description="Tumour (GTV) segmentation in T1-weighted MR: U-Mamba-Bot, 5 stages of 16-256 channels.",
        **_SARCOMA_BUDGET,
    ),
    "mr-tumour-unet": Recipe(
        arch="unet",
        overrides={"widths": (16, 32, 64, 128, 256)},
        description="U-Net baseline of mr-tumour (same data, split, steps, batch and patch size).",
        **_SARCOMA_BUDGET,
    ),
    "breast-dce": Recipe(
        arch="ultralight_vm_unet",
        overrides={},
        data="phantoms",
        steps=2000,
        batch_size=16,
        patch_size=(256, 256),
        phantoms_train=64,
        phantoms_val=8,
        modality="breast DCE-MRI, T1-weighted, 3 phases (pre-contrast, early and late post-contrast)",
        license="Apache-2.0 (trained on synthetic phantoms only)",
        training_data=(
            "synthetic breast DCE-MRI phantoms (napari_mamba_seg.data.make_phantom): 64 training and 8 held-back "
            "volumes of 60x256x256, seeds from 0, ACR density a-d, 0-3 lesions, fat-suppressed or not, 1.5 or 3 T, "
            "noise, bias field and motion varied; 2D axial slices"
        ),
        description=(
            "Breast, fibroglandular tissue and lesion in 3-phase breast DCE-MRI: UltraLight VM-UNet (49 k "
            "parameters), fast on the CPU. Trained on phantoms only: check its masks on real images (see metrics)."
        ),
        class_names=BREAST_CLASSES,
        channel_names=["pre-contrast", "early post-contrast", "late post-contrast"],
    ),
}


# ------------------------------------------------------------------------------------------------------------ data


def sarcoma_cases(folder: str | os.PathLike[str]) -> list[Any]:
    """Every case of an ibsi_sarcoma_mr-style folder (``<ID>/image.nii.gz`` + ``<ID>/mask.nii.gz``), sorted by ID.

    Raises:
        FileNotFoundError: The folder holds no such case.
    """
    from napari_mamba_seg.io import read_image
    from napari_mamba_seg.training import TrainingCase

    folder = Path(folder)
    ids = sorted(p.name for p in folder.iterdir() if (p / "image.nii.gz").is_file() and (p / "mask.nii.gz").is_file())
    if not ids:
        raise FileNotFoundError(
            f"{folder}: no <ID>/image.nii.gz + <ID>/mask.nii.gz cases; pass the ibsi_sarcoma_mr folder"
        )
    return [
        TrainingCase.from_images(
            read_image(folder / i / "image.nii.gz"), read_image(folder / i / "mask.nii.gz"), name=i
        )
        for i in ids
    ]


def phantom_settings(seed: int) -> dict[str, Any]:
    """The varied phantom settings of one seed (density, lesions, fat suppression, field, noise, bias, motion)."""
    rng = np.random.default_rng([seed, 7919])
    return {
        "density": str(rng.choice(["a", "b", "c", "d"])),
        "lesions": int(rng.integers(0, 4)),
        "lesion_kind": "random",
        "fat_suppression": bool(rng.random() < 0.7),
        "field_strength": float(rng.choice([1.5, 3.0])),
        "noise": float(rng.uniform(0.025, 0.067)),
        "bias_field": float(rng.uniform(0.0, 0.4)),
        "motion": float(rng.uniform(0.0, 1.5)),
        "seed": seed,
    }


def phantom_case(seed: int, shape: tuple[int, int, int] = (60, 256, 256)) -> Any:
    """One phantom as a training case of the breast model (muscle mapped to background)."""
    from napari_mamba_seg.data import make_phantom
    from napari_mamba_seg.training import TrainingCase

    phantom = make_phantom(shape=shape, **phantom_settings(seed))
    labels = PHANTOM_TO_BREAST_CLASS[phantom.labels]
    return TrainingCase(phantom.image, labels, None, phantom.spacing, f"phantom_{seed:04d}")


def phantom_cases(seeds: Sequence[int], shape: tuple[int, int, int] = (60, 256, 256), workers: int = 1) -> list[Any]:
    """Phantoms of ``seeds`` as training cases, generated in ``workers`` processes."""
    if workers <= 1:
        return [phantom_case(s, shape) for s in seeds]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(phantom_case, seeds, [shape] * len(seeds)))


def recipe_cases(recipe: Recipe, data: str | None, workers: int) -> tuple[list[Any], list[Any]]:
    """Training and validation cases of a recipe."""
    from napari_mamba_seg._cli_training import split_cases

    if recipe.data == "phantoms":
        train_seeds = range(recipe.phantoms_train)
        val_seeds = range(10_000, 10_000 + recipe.phantoms_val)  # never a training seed
        return phantom_cases(train_seeds, workers=workers), phantom_cases(val_seeds, workers=workers)
    if data is None:
        raise SystemExit(f"error: this recipe trains on {recipe.data}: give --data FOLDER")
    cases = sarcoma_cases(data)
    train_names, val_names = split_cases([c.name for c in cases], val_fraction=SARCOMA_VAL_FRACTION, seed=recipe.seed)
    return [c for c in cases if c.name in train_names], [c for c in cases if c.name in val_names]


# ------------------------------------------------------------------------------------------------------------ train


def recipe_with(recipe: Recipe, assignments: Sequence[str]) -> Recipe:
    """``recipe`` with fields changed by ``FIELD=VALUE`` strings (values in JSON: ``ema_decay=0.999``,
    ``lr=3e-4``, ``patch_size=[160,160]``), to try a variant without editing the recipes; the run's summary records
    the recipe as run.

    Raises:
        SystemExit: An assignment without ``=``, an unknown field or a value that is not JSON.
    """
    fields = {f.name for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for assignment in assignments:
        name, equals, text = assignment.partition("=")
        if not equals or name not in fields:
            raise SystemExit(f"error: --set {assignment!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise SystemExit(f"error: --set {assignment!r}: the value is not JSON ({error}); e.g. lr=3e-4") from error
        changes[name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(recipe, **changes)


def train(
    recipe: Recipe,
    train_cases: list[Any],
    val_cases: list[Any],
    out: Path,
    *,
    device: str = "auto",
    workers: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``recipe`` and write ``out/best``, ``out/last`` and ``out/summary.json``; the summary."""
    from napari_mamba_seg.bundles import ModelCard
    from napari_mamba_seg.models import create_seeded_model
    from napari_mamba_seg.training import Trainer, TrainingConfig
    from napari_mamba_seg.training.trainer import json_ready

    refuse = out / "summary.json"
    if refuse.exists() and not overwrite:
        raise SystemExit(f"error: {out} already holds a run; pass --overwrite or choose another --out")
    in_channels = int(train_cases[0].image.shape[0])
    model = create_seeded_model(  # the initial weights follow the recipe's seed, whatever ran before
        recipe.arch, recipe.seed, in_channels=in_channels, num_classes=len(recipe.class_names), **recipe.overrides
    )
    card = ModelCard(
        class_names=recipe.class_names,
        channel_names=recipe.channel_names,
        modality=recipe.modality,
        normalization={"method": "zscore"},
        training_data=recipe.training_data,
        description=recipe.description,
        license=recipe.license,
    )
    config = TrainingConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        patch_size=recipe.patch_size,
        lr=recipe.lr,
        warmup_steps=min(100, recipe.steps // 10),
        val_every=recipe.val_every,
        checkpoint_every=recipe.val_every,
        ema_decay=recipe.ema_decay,
        seed=recipe.seed,
        device=device,
        num_workers=workers,
    )
    trainer = Trainer(model, card, train_cases, val_cases, config, out, overwrite=overwrite)
    started = time.perf_counter()
    result = trainer.train(progress=None if quiet else _print_progress)
    seconds = time.perf_counter() - started
    summary = {
        "recipe": json_ready(dataclasses.asdict(recipe)),
        "train_cases": [c.name for c in train_cases],
        "val_cases": [c.name for c in val_cases],
        "device": str(trainer.device),
        "best_metrics": result.best_metrics,
        "history": result.history,
        "seconds": seconds,
        "steps_per_second": result.steps_run / seconds,
        "patches_per_second": result.steps_run * recipe.batch_size / seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    refuse.write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _print_progress(update: Any) -> None:
    if (update.stage == "validate" and update.metrics) or (update.stage == "train" and update.step % 100 == 0):
        print(update.message, flush=True)


# ------------------------------------------------------------------------------------------------- real breast case


def real_breast_metrics(
    model: str | os.PathLike[str], case_folder: str | os.PathLike[str], *, device: str = "cpu"
) -> tuple[dict[str, float], Any, Any]:
    """The breast model on the real breast_nact case: recall of its breast-tissue VOI mask and lesion Dice.

    Returns:
        ``(metrics, image, labels)``: ``breast_voi_recall`` (share of the VOI-mask voxels labelled breast,
        fibroglandular tissue or lesion), ``lesion_dice_vs_pe70`` (Dice of the lesion label against the rule-derived
        tumour mask over the whole volume), ``lesion_dice_vs_pe70_in_voi`` (the same inside the VOI mask only), and
        ``fgt_or_lesion_recall_of_pe70`` (share of the rule tumour labelled FGT or lesion); the image and the
        predicted labels.
    """
    from napari_mamba_seg.inference import PredictionSettings, Predictor
    from napari_mamba_seg.io import read_image
    from napari_mamba_seg.training.metrics import dice_per_class

    folder = Path(case_folder)
    image = read_image(folder / "dce.nii.gz")
    voi = read_image(folder / "breast_voi_mask.nii.gz").array[0] > 0
    tumour = read_image(folder / "tumour_pe70_mask.nii.gz").array[0] > 0
    predictor = Predictor.from_bundle(model, PredictionSettings(device=device))
    labels = predictor.predict(image).labels
    breast_class = labels > 0
    lesion = labels == BREAST_CLASSES.index("lesion")
    metrics = {
        "real_breast_voi_recall": float(breast_class[voi].mean()),
        "real_lesion_dice_vs_pe70": float(dice_per_class(lesion.astype(np.uint8), tumour.astype(np.uint8), 2)[1]),
        "real_lesion_dice_vs_pe70_in_voi": float(
            dice_per_class(lesion.astype(np.uint8), tumour.astype(np.uint8), 2, ignore=~voi)[1]
        ),
        "real_fgt_or_lesion_recall_of_pe70": float((labels[tumour] >= 2).mean()),
    }
    return metrics, image, labels


def overlay_picture(image: Any, labels: np.ndarray, voi: np.ndarray, tumour: np.ndarray, path: Path) -> Path:
    """Three slices of the late phase, side by side: the predicted labels filled (blue breast, yellow FGT, red
    lesion), the VOI breast mask outlined in green and the PE >= 70 % tumour in magenta. Written as PNG (Pillow)."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    late = image.array[-1].astype(np.float32)
    axis = int(np.argmax(image.geometry.spacing))
    counts = np.moveaxis(tumour, axis, 0).reshape(tumour.shape[axis], -1).sum(1)
    centre = int(np.argmax(counts))
    picks = [max(0, centre - 8), centre, min(tumour.shape[axis] - 1, centre + 8)]
    fills = np.array([[0, 0, 0], [50, 150, 255], [255, 215, 25], [255, 30, 30]], dtype=np.float32)
    alpha = np.array([0.0, 0.3, 0.4, 0.55], dtype=np.float32)
    top = float(np.percentile(late, 99.5)) or 1.0
    panels = []
    for index in picks:
        grey = np.clip(np.take(late, index, axis=axis) / top, 0, 1)[..., None] * 255 * np.ones(3, np.float32)
        label = np.take(labels, index, axis=axis)
        a = alpha[label][..., None]
        rgb = grey * (1 - a) + fills[label] * a
        rgb[find_boundaries(np.take(voi, index, axis=axis), mode="inner")] = (40, 255, 40)
        rgb[find_boundaries(np.take(tumour, index, axis=axis), mode="inner")] = (255, 0, 255)
        panel = Image.fromarray(rgb.astype(np.uint8)).resize((rgb.shape[1] * 2, rgb.shape[0] * 2), Image.NEAREST)
        ImageDraw.Draw(panel).text((6, 6), f"slice {index}", fill=(255, 255, 255))
        panels.append(panel)
    caption = 28
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height + caption), (0, 0, 0))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * panel.width, 0))
    ImageDraw.Draw(sheet).text(
        (6, panels[0].height + 8),
        "breast-dce on UCSF-BR-06, late phase. Filled: model (blue breast, yellow FGT, red lesion). "
        "Outlines: VOI breast-tissue mask (green), PE >= 70 % tumour (magenta).",
        fill=(255, 255, 255),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------- publish


def publish(
    name: str,
    run: Path,
    *,
    baseline: Path | None = None,
    real: Path | None = None,
    target_root: Path = REPO / "weights",
    overwrite: bool = False,
    which: str = "best",
) -> Path:
    """Copy ``run/best`` (or ``run/last`` with ``which="last"``) into ``weights/<name>`` with the card's metrics
    completed from the run summaries.

    ``best`` is the step with the best validation Dice, chosen on the split that then reports it (optimistic);
    ``last`` is the end of the run, chosen by nothing (with a moving average of the weights, the recipe's
    ``ema_decay``, the end of the run is a sound choice). The baseline's metrics are taken the same way.
    """
    from napari_mamba_seg.bundles import load_bundle, save_bundle

    if which not in ("best", "last"):
        raise SystemExit(f"error: which must be 'best' or 'last', not {which!r}")
    summary = json.loads((run / "summary.json").read_text())
    bundle = load_bundle(run / which)
    chosen = _validated_metrics(summary, which)
    metrics = {f"val_{k}" if k != "step" else f"{which}_step": v for k, v in chosen.items()}
    metrics["val_cases"] = len(summary["val_cases"])
    metrics["last_step_val_mean_dice"] = _validated_metrics(summary, "last")["mean_dice"]
    metrics["best_step_val_mean_dice"] = _validated_metrics(summary, "best")["mean_dice"]
    if baseline is not None:
        base = json.loads((baseline / "summary.json").read_text())
        if base["val_cases"] != summary["val_cases"] or base["recipe"]["steps"] != summary["recipe"]["steps"]:
            raise SystemExit("error: the baseline run has another validation split or budget")
        metrics |= {
            f"baseline_{base['recipe']['arch']}_val_{k}": v
            for k, v in _validated_metrics(base, which).items()
            if k != "step"
        }
    if real is not None:
        metrics |= json.loads(real.read_text())
    card = dataclasses.replace(
        bundle.card,
        metrics=metrics,
        training_data=f"{bundle.card.training_data}; validation cases: {', '.join(summary['val_cases'])}",
    )
    save_bundle(bundle.model, target_root / name, card, overwrite=overwrite)
    return target_root / name


def _validated_metrics(summary: dict[str, Any], which: str) -> dict[str, float]:
    """The validation metrics (with ``step``) of a run summary's best step or of its last validation."""
    if which == "best":
        return dict(summary["best_metrics"])
    last = [entry for entry in summary["history"] if "mean_dice" in entry][-1]
    return {k: v for k, v in last.items() if k == "step" or k == "mean_dice" or k.startswith("dice_")}


# ------------------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train one recipe")
    t.add_argument("recipe", choices=sorted(RECIPES))
    t.add_argument("--data", help="the ibsi_sarcoma_mr folder (mr-tumour recipes)")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--steps", type=int, help="override the recipe's steps (for a quick check)")
    t.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="change a recipe field (JSON value)"
    )
    t.add_argument("--device", default="auto")
    t.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) - 1, help="data-loading processes")
    t.add_argument("--overwrite", action="store_true")
    r = commands.add_parser("real-breast", help="evaluate a breast model on the real breast_nact case")
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True, type=Path, help="breast_nact/UCSF-BR-06")
    r.add_argument("--picture", type=Path)
    r.add_argument("--json", type=Path)
    r.add_argument("--device", default="cpu")
    p = commands.add_parser("publish", help="copy a run's best bundle into weights/ with its card completed")
    p.add_argument("name", choices=[n for n in RECIPES if not n.endswith("-unet")])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--baseline", type=Path)
    p.add_argument("--real", type=Path)
    p.add_argument("--bundle", choices=("best", "last"), default="best", help="the run's best step or its end")
    p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "train":
        recipe = recipe_with(RECIPES[args.recipe], args.set)
        if args.steps:
            recipe = dataclasses.replace(recipe, steps=args.steps, val_every=min(recipe.val_every, args.steps))
        workers = max(0, args.workers)
        train_cases, val_cases = recipe_cases(recipe, args.data, max(1, workers))
        print(f"{args.recipe}: {len(train_cases)} training and {len(val_cases)} validation cases", flush=True)
        summary = train(
            recipe, train_cases, val_cases, args.out, device=args.device, workers=workers, overwrite=args.overwrite
        )
        print(json.dumps({k: summary[k] for k in ("best_metrics", "seconds", "patches_per_second", "parameters")}))
    elif args.command == "real-breast":
        from napari_mamba_seg.io import read_image

        metrics, image, labels = real_breast_metrics(args.model, args.data, device=args.device)
        print(json.dumps(metrics, indent=2))
        if args.json:
            args.json.write_text(json.dumps(metrics, indent=2))
        if args.picture:
            voi = read_image(args.data / "breast_voi_mask.nii.gz").array[0] > 0
            tumour = read_image(args.data / "tumour_pe70_mask.nii.gz").array[0] > 0
            print(overlay_picture(image, labels, voi, tumour, args.picture))
    else:
        print(
            publish(
                args.name, args.run, baseline=args.baseline, real=args.real, overwrite=args.overwrite, which=args.bundle
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
