"""``napari-mamba-seg finetune``: fine-tune a model bundle on corrected studies from files (the Fine-tune widget's
work, from a script). Standard library only at import time; torch is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Fine-tune a model bundle on corrected studies: --images and --labels pair up in order (one image per study: a "
    "NIfTI/TIFF file or a DICOM series folder, channels as the model expects; labels on the image's grid). Only the"
    " reviewed slices train (--reviewed, one value per study: slice indices like 10,20,31 along --axis, or a JSON "
    "file with a review record {'axis', 'num_slices', 'reviewed'} as the Correct widget stores it; without "
    "--reviewed every slice counts). Every --holdout-every-th reviewed slice is held out: the parent and the fine-"
    "tuned model are scored on it and the result says whether the new model is better (activated) or not. With "
    "--predicted (the model's own prediction each study's corrections started from) and --changed-weight W, the "
    "reviewed voxels the clinician changed count W times in the loss. The new bundle goes to OUTDIR (it must not "
    "exist) with provenance.json. Exit status: 0 done (activated or not: see the last line), 1 failed, 2 usage or "
    "data error, 130 interrupted (nothing written)."
)


def add_finetune_parser(subcommands: argparse._SubParsersAction) -> None:
    """Register ``finetune``."""
    parser = subcommands.add_parser(
        "finetune", help="fine-tune a model bundle on corrected, reviewed slices", description=DESCRIPTION
    )
    parser.add_argument("--model", "-m", required=True, metavar="NAME_OR_FOLDER", help="the bundle to start from")
    parser.add_argument("--images", nargs="+", required=True, metavar="IMAGE", help="one image per study")
    parser.add_argument("--labels", nargs="+", required=True, metavar="LABELS", help="its corrected labels")
    parser.add_argument("--reviewed", nargs="+", metavar="SLICES_OR_JSON", help="reviewed slices, one per study")
    parser.add_argument("--axis", default="auto", help="slice axis of --reviewed indices: auto (coarsest) or 0-2")
    parser.add_argument("--output", "-o", required=True, metavar="OUTDIR", help="the new bundle folder")
    parser.add_argument("--predicted", nargs="+", metavar="PREDICTION", help="the model's prediction, one per study")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument(
        "--epochs", type=int, help="train this many epochs instead of --steps (an epoch: one patch per training slice)"
    )
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: 3e-4)")
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step (default: 2)")
    parser.add_argument("--holdout-every", type=int, default=3, help="hold out every N-th reviewed slice (default 3)")
    parser.add_argument("--no-augmentation", action="store_true", help="train on the slices as they are")
    parser.add_argument(
        "--changed-weight", type=float, default=1.0, help="loss weight of voxels changed from --predicted (default: 1)"
    )
    parser.add_argument("--freeze-encoder", action="store_true", help="train the decoder side only")
    parser.add_argument(
        "--anchor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="half of the patches rehearse the model's own prediction on the unreviewed slices (--predicted, else "
        "predicted here), so the corrections do not shift the whole study (default: on)",
    )
    parser.add_argument(
        "--defer-to-corrections",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the anchor leaves out where the training slices' corrections showed the model wrong: the positions "
        "they corrected (grown by 3 mm) on the slices within 20 mm of them, farther away a foreground they removed "
        "that the model repeats (default: on)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no per-step output")
    parser.set_defaults(handler=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    """Read the studies, fine-tune, write the new bundle; one line per user error."""
    from napari_mamba_seg.cli import _one_line
    from napari_mamba_seg.inference.files import USER_ERRORS

    output = Path(args.output)
    try:
        if output.exists():
            raise FileExistsError(f"{output} exists; a fine-tuned model is always written to a new folder")
        studies = read_studies(args)
        from napari_mamba_seg.training.finetune import FineTuneSettings, finetune, write_bundle

        settings = FineTuneSettings(
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            augment=not args.no_augmentation,
            holdout_every=args.holdout_every,
            seed=args.seed,
            device=args.device,
            epochs=args.epochs,
            changed_weight=args.changed_weight,
            freeze_encoder=args.freeze_encoder,
            anchor=args.anchor,
            defer_to_corrections=args.defer_to_corrections,
        )
        outcome = finetune(args.model, studies, settings, progress=None if args.quiet else _print_step)
        folder = write_bundle(outcome, output)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(f"{folder}: held-out Dice {outcome.before:.3f} -> {outcome.after:.3f}")
    print(outcome.reason)
    return 0


def _print_step(update: Any) -> None:
    """The loss of every step and each held-out score."""
    if (update.stage == "train" and update.loss is not None) or (update.stage == "validate" and update.metrics):
        print(update.message, flush=True)


def read_studies(args: argparse.Namespace) -> list[Any]:
    """The :class:`~napari_mamba_seg.training.finetune.CorrectedStudy` of each --images/--labels/--reviewed."""
    from napari_mamba_seg.inference.predictor import slice_axis_for
    from napari_mamba_seg.interactive import ReviewState
    from napari_mamba_seg.io import read_image
    from napari_mamba_seg.training.finetune import CorrectedStudy

    if len(args.images) != len(args.labels):
        raise ValueError(f"{len(args.images)} --images but {len(args.labels)} --labels: give one labels file per image")
    if args.reviewed and len(args.reviewed) != len(args.images):
        raise ValueError(f"{len(args.reviewed)} --reviewed values for {len(args.images)} images: give one per image")
    if args.changed_weight != 1.0 and not args.predicted:
        raise ValueError("--changed-weight needs --predicted: the model's prediction the corrections started from")
    if args.predicted and len(args.predicted) != len(args.images):
        raise ValueError(f"{len(args.predicted)} --predicted files for {len(args.images)} images: give one per image")
    studies = []
    for index, (image_path, labels_path) in enumerate(zip(args.images, args.labels, strict=True)):
        image = read_image(image_path)
        labels_array = _on_grid(labels_path, image, image_path)
        spacing = image.geometry.spacing
        axis = slice_axis_for(spacing, args.axis if args.axis == "auto" else int(args.axis))
        shape = image.array.shape[1:]
        if args.reviewed:
            review = _review(args.reviewed[index], axis, shape)
        else:
            review = ReviewState(axis, shape[axis], set(range(shape[axis])))
        predicted = _on_grid(args.predicted[index], image, image_path)[0] if args.predicted else None
        name = Path(str(image_path)).name
        studies.append(CorrectedStudy(image.array, labels_array[0], review, spacing, name, predicted))
    return studies


def _on_grid(path: str, image: Any, image_path: str) -> Any:
    """The ``(1, *spatial)`` array of the labels file ``path``, if it lies on ``image``'s voxel grid."""
    from napari_mamba_seg.io import read_image

    labels = read_image(path)
    if labels.array.shape[1:] != image.array.shape[1:] or not labels.geometry.is_close(image.geometry):
        raise ValueError(f"{path} does not lie on the voxel grid of {image_path}; resample it first")
    return labels.array


def _review(value: str, axis: int, shape: tuple[int, ...]) -> Any:
    from napari_mamba_seg.interactive import ReviewState

    if value.endswith(".json"):
        record = json.loads(Path(value).read_text())
        state = ReviewState.from_dict(record)
        state.check_fits(shape)
        return state
    try:
        slices = {int(part) for part in value.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"--reviewed {value!r}: give slice indices like 10,20,31 or a .json review record") from None
    return ReviewState(axis, shape[axis], slices)
