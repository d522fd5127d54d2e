"""The ``train`` and ``evaluate`` subcommands of ``napari-mamba-seg``: their parsers and handlers.

:mod:`napari_mamba_seg.cli` adds the parsers from here. At import time this module uses the standard library only;
numpy, torch and the training engine are imported inside the handlers, so ``napari-mamba-seg --help`` stays instant.

Validation split of ``train`` (deterministic in ``--seed``): the case names of the data set, sorted, are shuffled with
``numpy.random.default_rng(seed).permutation``; the first ``round(fraction * n)`` of them (at least 1 when the
fraction is above 0, and never all of them) validate, the others train. ``--val-cases`` names the validation cases
instead. The split is printed, recorded in the card's ``training_data`` and in the trainer state (``--resume``
reuses it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_mamba_seg.cli import _one_line, format_table

if TYPE_CHECKING:
    from napari_mamba_seg.inference import Predictor
    from napari_mamba_seg.training import EvaluationResult, NnUNetRawDataset, Trainer, TrainingProgress
    from napari_mamba_seg.training.distributed import DistributedContext

__all__ = [
    "add_evaluate_parser",
    "add_train_parser",
    "evaluation_rows",
    "format_evaluation_table",
    "run_evaluate",
    "run_train",
    "split_cases",
    "write_csv",
]

DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 2
DEFAULT_LR = 1e-3
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_VAL_EVERY = 250
DEFAULT_CHECKPOINT_EVERY = 250
DEFAULT_CACHE_CASES = 8
"""Prepared cases each process keeps in memory (the data set streams from disk; --cache-cases)."""
# Options that only shape a new run: --resume continues the saved run with its own.
NEW_RUN_OPTIONS = (
    "arch",
    "from_bundle",
    "patch_size",
    "normalization",
    "seed",
    "val_fraction",
    "val_cases",
    "ema_decay",
)
# Options --resume may change (TrainingConfig field names).
RESUMABLE_OPTIONS = {
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "device": "device",
    "val_every": "val_every",
    "checkpoint_every": "checkpoint_every",
    "patience": "early_stopping_patience",
    "cache_cases": "cache_size",
}
_SPACING_RTOL = 1e-3


class UsageError(ValueError):
    """Options that do not go together; reported in one line with exit status 2."""


# --------------------------------------------------------------------------------------------------------- parsers


def add_train_parser(subcommands: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-parser to ``napari-mamba-seg``'s sub-parsers."""
    train = subcommands.add_parser(
        "train",
        help="train or fine-tune a model on an nnU-Net v2 raw data set folder",
        description=(
            "Train a new model (--arch) or fine-tune a model bundle (--from-bundle) on DATASET, an nnU-Net v2 raw "
            "data set folder (dataset.json, imagesTr/, labelsTr/). The model card takes the class and channel names "
            "from dataset.json and records the data set and the validation split. Checkpoints go to OUTDIR/last "
            "(model bundle + trainer state, for --resume) and the bundle with the best validation mean Dice to "
            "OUTDIR/best; use either with `predict --model` or `evaluate --model`. Validation split: the sorted case "
            "names shuffled with numpy.random.default_rng(SEED); the first round(FRACTION * cases) validate (at "
            "least one, never all). Ctrl-C stops after the current step and keeps the last checkpoint (Ctrl-C again "
            "stops at once). Exit status: 0 done, 1 training failed, 2 usage or data error (nothing trained), 130 "
            "interrupted. Several GPUs (or CPU processes): launch with torchrun, e.g. `torchrun --standalone "
            "--nproc_per_node 4 -m napari_mamba_seg.cli train ...`: data-parallel, --batch-size is the global batch "
            "(divisible by the number of processes), process 0 writes and prints; --resume works with another "
            "number of processes."
        ),
    )
    train.add_argument("dataset", metavar="DATASET", help="nnU-Net v2 raw data set folder")
    train.add_argument("--output", "-o", required=True, metavar="OUTDIR", help="folder for the checkpoints")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--arch", metavar="NAME", help="train this architecture from scratch (see `models`)")
    start.add_argument(
        "--from-bundle", metavar="NAME_OR_FOLDER", help="fine-tune this model bundle (its normalisation is kept)"
    )
    train.add_argument("--steps", type=int, metavar="N", help=f"total optimizer steps (default: {DEFAULT_STEPS})")
    train.add_argument("--batch-size", type=int, metavar="N", help=f"patches per step (default: {DEFAULT_BATCH_SIZE})")
    train.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        metavar="N",
        help="patch size in voxels, 2 values for a 2D model, 3 for a 3D one (default: the bundle's, else 256 256 "
        "or 64 128 128)",
    )
    train.add_argument("--lr", type=float, help=f"peak learning rate of AdamW (default: {DEFAULT_LR:g})")
    train.add_argument(
        "--ema-decay",
        type=float,
        metavar="DECAY",
        help="validate and save a moving average of the weights with this decay, e.g. 0.999 (default: none, the "
        "last step's weights)",
    )
    split = train.add_mutually_exclusive_group()
    split.add_argument(
        "--val-fraction",
        type=float,
        metavar="FRACTION",
        help=f"share of the cases held out for validation, chosen by --seed (default: {DEFAULT_VAL_FRACTION}; "
        "0 = no validation and no best bundle)",
    )
    split.add_argument("--val-cases", nargs="+", metavar="NAME", help="validate on these cases instead")
    train.add_argument(
        "--seed", type=int, metavar="N", help="seed of the split, the patches and the augmentation (default: 0)"
    )
    train.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps (default: auto)")
    train.add_argument(
        "--val-every",
        type=int,
        metavar="STEPS",
        help=f"validate every STEPS steps and at the end (default: {DEFAULT_VAL_EVERY}; 0 = only at the end)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help=f"write OUTDIR/last every STEPS steps and at the end "
        f"(default: {DEFAULT_CHECKPOINT_EVERY}; 0 = only at the end)",
    )
    train.add_argument(
        "--patience", type=int, metavar="N", help="stop after N validations without improvement (default: never)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUTDIR at its step, on its cases; only --steps, --batch-size, --lr, --device, "
        "--val-every, --checkpoint-every, --patience and --cache-cases may change (a larger --steps trains longer); "
        "the number of processes may change too",
    )
    train.add_argument("--overwrite", action="store_true", help="replace the run in OUTDIR (its last/ and best/)")
    train.add_argument(
        "--normalization",
        choices=("zscore", "percentile"),
        help="input normalisation of a new model (default: percentile when every channel is named CT, as nnU-Net, "
        "else zscore)",
    )
    train.add_argument(
        "--cache-cases",
        type=int,
        metavar="N",
        help=f"cases are read from disk when drawn; keep the last N prepared ones in memory per process "
        f"(default: {DEFAULT_CACHE_CASES}; more is faster, never changes the result)",
    )
    train.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    train.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    train.set_defaults(handler=run_train)


def add_evaluate_parser(subcommands: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` sub-parser to ``napari-mamba-seg``'s sub-parsers."""
    evaluate = subcommands.add_parser(
        "evaluate",
        help="Dice (and HD95) of a model bundle on an nnU-Net v2 raw data set folder",
        description=(
            "Segment every case of DATASET (an nnU-Net v2 raw data set folder: dataset.json, imagesTr/, labelsTr/) "
            "with a model bundle and print a table: one row per case with the Dice of each foreground class and "
            "their mean (and the HD95 in mm with --hd95), then the mean row (each column averaged over the cases "
            "where it is defined; its mean_dice is the mean of the class means, as training's validation reports "
            "it). nan: the class is in neither the labels nor the prediction; inf: in only one of them. Voxels "
            "with dataset.json's 'ignore' label are left out of the Dice; HD95 is nan for such cases. Exit status: "
            "0 done, 1 evaluation failed, 2 usage or data error, 130 interrupted."
        ),
    )
    evaluate.add_argument("dataset", metavar="DATASET", help="nnU-Net v2 raw data set folder")
    evaluate.add_argument(
        "--model", "-m", required=True, metavar="NAME_OR_FOLDER", help="a bundle name (see `models`) or folder"
    )
    evaluate.add_argument("--cases", nargs="+", metavar="NAME", help="evaluate these cases only (default: all)")
    evaluate.add_argument("--hd95", action="store_true", help="also the 95th-percentile Hausdorff distance (slower)")
    evaluate.add_argument("--csv", metavar="FILE", help="also write the table as CSV (full precision)")
    evaluate.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps (default: auto)"
    )
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    evaluate.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    evaluate.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    evaluate.set_defaults(handler=run_evaluate)


# ----------------------------------------------------------------------------------------------------------- train


def run_train(args: argparse.Namespace) -> int:
    """Train, fine-tune or resume as the options say; one line per error, never a traceback for user errors.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this: data-parallel training
    (:mod:`napari_mamba_seg.training.distributed`), process 0 prints and writes the checkpoints, the others stay
    silent unless they fail on their own, and every process returns the same status.

    Returns:
        0 when training ran to the end (or stopped early), 1 when it failed, 2 when it could not start, 130 when
        interrupted (``OUTDIR/last`` stays the last good checkpoint).
    """
    from napari_mamba_seg.inference.files import USER_ERRORS
    from napari_mamba_seg.training.distributed import init_distributed, shutdown_distributed

    try:
        context = init_distributed(_requested_device(args))
    except USER_ERRORS as error:
        if os.environ.get("RANK", "0") == "0":  # the same error in every process: said once
            print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # the rendezvous of the processes failed (torch.distributed's errors)
        print(f"error: could not start data-parallel training: {_one_line(error)}", file=sys.stderr)
        return 1
    try:
        return _run_train(args, context)
    finally:
        shutdown_distributed()


def _run_train(args: argparse.Namespace, context: DistributedContext | None) -> int:
    """:func:`run_train` once the process group (if any) is set up."""
    from napari_mamba_seg.inference.files import USER_ERRORS
    from napari_mamba_seg.training.distributed import OtherProcessFailed, run_main_first

    main = context is None or context.is_main
    try:
        with _silenced(not main):  # process 0 prepares first, then the others (run_main_first)
            trainer = run_main_first(lambda: _prepare_trainer(args))
    except KeyboardInterrupt:
        _report("\ninterrupted: nothing was trained", context)
        return 130
    except (*USER_ERRORS, OtherProcessFailed) as error:
        _report(f"error: {_one_line(error)}", context)
        return 2
    import torch

    output = Path(args.output)
    if trainer.step >= trainer.config.steps:
        if main:
            print(f"{output} is already at step {trainer.step} of {trainer.config.steps}; give a larger --steps")
        return 0
    try:
        with _silenced(not main):
            result = _train_with_progress(trainer, args.quiet or not main)
    except KeyboardInterrupt:
        _report(f"\ninterrupted: {_checkpoint_note(output, args)}", context)
        return 130
    except (*USER_ERRORS, FloatingPointError) as error:
        # a diverged loss is the global batch's loss: the same on every process, reported once
        _report(
            f"error: {_one_line(error)}; {_checkpoint_note(output, args)}",
            context,
            isinstance(error, FloatingPointError),
        )
        return 1
    except torch.OutOfMemoryError as error:
        message = (
            f"error: out of {trainer.device.type.upper()} memory ({_one_line(error)[:200]}); lower --batch-size or "
            f"--patch-size; {_checkpoint_note(output, args)}"
        )
        _report(message, context, False)
        return 1
    except Exception as error:
        if args.debug:
            raise
        _report(f"{_unexpected(error)}; {_checkpoint_note(output, args)}", context, False)
        return 1
    if result.cancelled:
        _report(f"interrupted at step {result.step}: {_checkpoint_note(output, args)}", context)
        return 130
    if main:
        _print_outcome(result, trainer)
    return 0


def _requested_device(args: argparse.Namespace) -> str:
    """The device the run asks for (--device, else a resumed run's, else auto); it picks the process group's backend."""
    from napari_mamba_seg.training import LAST
    from napari_mamba_seg.training.checkpoint import STATE_JSON

    if args.device:
        return args.device
    if args.resume:  # an unreadable state is reported, with its file name, when the run is prepared
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            return str(json.loads((Path(args.output) / LAST / STATE_JSON).read_text("utf-8"))["config"]["device"])
    return "auto"


def _report(message: str, context: DistributedContext | None, same_on_every_process: bool = True) -> None:
    """Print ``message`` on stderr: from process 0; from another process only what it alone may know, tagged."""
    if context is None or context.is_main:
        print(message, file=sys.stderr)
    elif not same_on_every_process:
        print(f"[process {context.rank} of {context.world_size}] {message.strip()}", file=sys.stderr)


@contextlib.contextmanager
def _silenced(silent: bool) -> Iterator[None]:
    """With ``silent``, nothing on stdout or stderr (data-parallel processes other than 0: process 0 speaks)."""
    if not silent:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def split_cases(
    names: Sequence[str], *, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, val_cases: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """The training and validation case names (see the module docstring for the rule).

    Args:
        names: Every case name of the data set.
        val_fraction: Share of the cases to validate on, in [0, 1).
        seed: Seed of the shuffle.
        val_cases: Explicit validation cases (then ``val_fraction`` and ``seed`` are not used).

    Returns:
        ``(train_names, val_names)``, each in the order of ``names``.

    Raises:
        ValueError: A fraction outside [0, 1), unknown validation case names, or no case left for training.
    """
    import numpy as np

    names = list(names)
    if val_cases:
        unknown = [name for name in val_cases if name not in names]
        if unknown:
            raise ValueError(f"--val-cases {', '.join(unknown)}: no such case(s); the cases are {_listing(names)}")
        chosen = set(val_cases)
    else:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
        count = round(val_fraction * len(names))
        count = min(max(count, 1 if val_fraction > 0 else 0), len(names) - 1)
        order = np.random.default_rng(seed).permutation(len(names))
        chosen = {names[i] for i in order[:count]}
    train = [name for name in names if name not in chosen]
    if not train:
        raise ValueError("every case would be a validation case; leave at least one for training")
    return train, [name for name in names if name in chosen]


def _prepare_trainer(args: argparse.Namespace) -> Trainer:
    """The trainer for a new run, a fine-tuning run or a resumed one, after every option and the data set passed."""
    from napari_mamba_seg.training import NnUNetRawDataset

    _check_train_options(args)
    dataset = NnUNetRawDataset(args.dataset)
    if args.resume:
        trainer = _resumed_trainer(args, dataset)
    else:
        _refuse_existing_run(Path(args.output), args.overwrite)
        train_names, val_names = split_cases(
            dataset.case_names,
            val_fraction=_or_default(args.val_fraction, DEFAULT_VAL_FRACTION),
            seed=_or_default(args.seed, 0),
            val_cases=args.val_cases or (),
        )
        train, val = _subset(dataset, train_names), _subset(dataset, val_names) if val_names else None
        trainer = _new_trainer(args, dataset, train, val, _training_data(args, dataset, train_names, val_names))
    _print_split(dataset, trainer)
    return trainer


def _check_train_options(args: argparse.Namespace) -> None:
    if args.resume:
        given = [f"--{name.replace('_', '-')}" for name in NEW_RUN_OPTIONS if getattr(args, name) is not None]
        if args.overwrite:
            given.append("--overwrite")
        if given:
            raise UsageError(
                f"--resume continues the run in {args.output} with its own settings and cases; drop "
                f"{', '.join(given)} (with --resume only {', '.join(_flags(RESUMABLE_OPTIONS))} may change)"
            )
    elif args.arch is None and args.from_bundle is None:
        raise UsageError("give --arch NAME (a new model) or --from-bundle NAME_OR_FOLDER (fine-tune), or --resume")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed}")
    if args.from_bundle is not None and args.normalization is not None:
        raise UsageError("--normalization applies to new models only: a fine-tuned bundle keeps its normalisation")


def _refuse_existing_run(output: Path, overwrite: bool) -> None:
    from napari_mamba_seg.bundles import CARD_FILE
    from napari_mamba_seg.training import BEST, LAST

    if output.exists() and not output.is_dir():
        raise FileExistsError(f"-o {output} is a file; give a folder for the checkpoints")
    existing = [f"{name}/" for name in (LAST, BEST) if (output / name / CARD_FILE).is_file()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{output} already holds a training run ({', '.join(existing)}); continue it with --resume, replace it "
            "with --overwrite, or choose another -o folder"
        )


def _new_trainer(
    args: argparse.Namespace,
    dataset: NnUNetRawDataset,
    train: NnUNetRawDataset,
    val: NnUNetRawDataset | None,
    training_data: str,
) -> Trainer:
    from napari_mamba_seg.bundles import ModelCard
    from napari_mamba_seg.models import create_seeded_model, get_model_entry
    from napari_mamba_seg.training import Trainer, TrainingConfig

    config = TrainingConfig(
        steps=_or_default(args.steps, DEFAULT_STEPS),
        batch_size=_or_default(args.batch_size, DEFAULT_BATCH_SIZE),
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        lr=_or_default(args.lr, DEFAULT_LR),
        val_every=_or_default(args.val_every, DEFAULT_VAL_EVERY),
        checkpoint_every=_or_default(args.checkpoint_every, DEFAULT_CHECKPOINT_EVERY),
        early_stopping_patience=args.patience,
        seed=_or_default(args.seed, 0),
        device=_or_default(args.device, "auto"),
        cache_size=_or_default(args.cache_cases, DEFAULT_CACHE_CASES),
        ema_decay=args.ema_decay,
    )
    if args.from_bundle is not None:
        _check_bundle_fits(args.from_bundle, dataset)
        return Trainer.from_bundle(
            args.from_bundle, train, val, config, args.output, overwrite=args.overwrite, training_data=training_data
        )
    spatial_dims = get_model_entry(args.arch).spatial_dims
    card = ModelCard(
        class_names=dataset.class_names,
        channel_names=dataset.channel_names,
        normalization={"method": args.normalization or _default_normalization(dataset.channel_names)},
        spacing=_common_spacing(dataset, spatial_dims),
        training_data=training_data,
        description=f"trained with `napari-mamba-seg train` on {dataset.folder.name}",
    )
    model = create_seeded_model(  # the initial weights follow --seed, whatever ran before
        args.arch, config.seed, in_channels=len(dataset.channel_names), num_classes=dataset.num_classes
    )
    return Trainer(model, card, train, val, config, args.output, overwrite=args.overwrite)


def _resumed_trainer(args: argparse.Namespace, dataset: NnUNetRawDataset) -> Trainer:
    from napari_mamba_seg.training import LAST, Trainer, read_trainer_state, recover_checkpoint

    output = Path(args.output)
    folder = recover_checkpoint(output / LAST)
    if folder is None:
        raise FileNotFoundError(
            f"{output} holds no training run to resume (no {LAST}/ checkpoint); start one without --resume"
        )
    state, _ = read_trainer_state(folder)
    train_names, val_names = list(state.get("train_cases", [])), list(state.get("val_cases", []))
    missing = [name for name in (*train_names, *val_names) if name not in dataset.case_names]
    if missing:
        raise ValueError(
            f"the run in {output} used case(s) {_listing(missing)} that {dataset.folder} does not hold; resume on "
            "the data set it was trained on"
        )
    changes = {field: getattr(args, option) for option, field in RESUMABLE_OPTIONS.items()}
    changes = {field: value for field, value in changes.items() if value is not None}
    if state.get("config", {}).get("cache_size") is None:  # a run saved before --cache-cases: stream it too
        changes.setdefault("cache_size", DEFAULT_CACHE_CASES)
    val = _subset(dataset, val_names) if val_names else None
    return Trainer.resume(output, _subset(dataset, train_names), val, **changes)


def _check_bundle_fits(source: str, dataset: NnUNetRawDataset) -> None:
    """Refuse a bundle whose input channels or classes differ from the data set's; warn when only names differ."""
    from napari_mamba_seg.bundles import read_card

    card = read_card(source)
    json_file = dataset.folder / "dataset.json"
    if card.in_channels is not None and card.in_channels != len(dataset.channel_names):
        raise ValueError(
            f"bundle {source} takes {card.in_channels} input channel(s) ({', '.join(card.channel_names) or '?'}) "
            f"but {json_file} has {len(dataset.channel_names)} ({', '.join(dataset.channel_names)}); fine-tune a "
            "bundle made for these channels, or train a new model with --arch"
        )
    if card.num_classes is not None and card.num_classes != dataset.num_classes:
        raise ValueError(
            f"bundle {source} predicts {card.num_classes} classes ({', '.join(card.class_names) or '?'}) but "
            f"{json_file} has {dataset.num_classes} ({', '.join(dataset.class_names)}); fine-tune a bundle with "
            "these classes, or train a new model with --arch"
        )
    _warn_if_names_differ("class", card.class_names, dataset.class_names, source, json_file)
    _warn_if_names_differ("channel", card.channel_names, dataset.channel_names, source, json_file)


def _warn_if_names_differ(what: str, bundle: list[str], data: list[str], source: str, json_file: Path) -> None:
    if bundle and [n.lower() for n in bundle] != [n.lower() for n in data]:
        print(
            f"warning: the {what} names of bundle {source} ({', '.join(bundle)}) differ from those of {json_file} "
            f"({', '.join(data)}); they are matched by position and the bundle's names are kept",
            file=sys.stderr,
        )


def _default_normalization(channel_names: Sequence[str]) -> str:
    """nnU-Net's choice: CT channels get a percentile-based normalisation, everything else a z-score."""
    return "percentile" if channel_names and all(n.strip().upper() == "CT" for n in channel_names) else "zscore"


def _common_spacing(dataset: NnUNetRawDataset, spatial_dims: int) -> list[float] | None:
    """The voxel spacing shared by every labelled case (in-plane for a 2D model), or None when they differ.

    The spacing is read from the label files' headers (NIfTI) or the label files (other formats).
    """
    from napari_mamba_seg.training import slice_axis_for

    spacings = [_file_spacing(dataset.label_file(name)) for name in dataset.case_names]
    first = spacings[0]
    if first is None or any(s is None or len(s) != len(first) for s in spacings):
        return None
    if any(not math.isclose(a, b, rel_tol=_SPACING_RTOL) for s in spacings for a, b in zip(s, first, strict=True)):
        return None
    if spatial_dims == 2 and len(first) == 3:
        axis = slice_axis_for(first)
        return [s for a, s in enumerate(first) if a != axis]
    return list(first) if len(first) == spatial_dims else None


def _file_spacing(path: Path) -> tuple[float, ...] | None:
    """The voxel spacing of an image file in array order (mm), or None when it cannot be read."""
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            from napari_mamba_seg.io import ImageGeometry

            return ImageGeometry.from_nifti_affine(nib.load(path).affine).spacing
        from napari_mamba_seg.io import read_image

        return read_image(path).geometry.spacing
    except Exception:  # an unreadable file is reported, with its name, when training reads it
        return None


def _training_data(
    args: argparse.Namespace, dataset: NnUNetRawDataset, train_names: list[str], val_names: list[str]
) -> str:
    """The card's ``training_data``: the data set, the case counts and the validation split."""
    if args.val_cases:
        how = "chosen with --val-cases"
    else:
        fraction = _or_default(args.val_fraction, DEFAULT_VAL_FRACTION)
        how = f"validation fraction {fraction:g}, split seed {_or_default(args.seed, 0)}"
    validation = f"{len(val_names)} for validation ({', '.join(val_names)}; {how})" if val_names else "no validation"
    return (
        f"nnU-Net v2 raw data set {dataset.folder.name} ({dataset.folder.resolve()}): {len(dataset)} labelled "
        f"case(s), {len(train_names)} for training, {validation}"
    )


def _print_split(dataset: NnUNetRawDataset, trainer: Trainer) -> None:
    train_names = trainer.train_cases.case_names
    val_names = trainer.val_cases.case_names if trainer.val_cases is not None else []
    print(f"{dataset.folder}: {len(train_names)} training case(s): {_listing(train_names, 10)}")
    print(f"{len(val_names)} validation case(s): {', '.join(val_names) if val_names else 'none'}")


def _subset(dataset: NnUNetRawDataset, names: Sequence[str]) -> NnUNetRawDataset:
    """The same lazy data set restricted to ``names`` (read from disk on access, like the full one)."""
    subset = copy.copy(dataset)
    subset.case_names = list(names)
    return subset


@contextlib.contextmanager
def _ctrl_c_sets(cancel: threading.Event) -> Iterator[None]:
    """While active, Ctrl-C sets ``cancel`` (training stops after the current step); a second one interrupts now.

    Only the main thread can handle signals; elsewhere Ctrl-C stays a plain KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\ninterrupt: stopping after the current step (Ctrl-C again stops at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _train_with_progress(trainer: Trainer, quiet: bool) -> Any:
    """Run the trainer with a progress bar on stderr (unless ``quiet``) and a line per validation on stdout."""
    from tqdm import tqdm

    cancel = threading.Event()
    with (
        tqdm(
            total=trainer.config.steps,
            initial=trainer.step,
            unit="step",
            desc="training",
            file=sys.stderr,
            disable=quiet,
            dynamic_ncols=True,
        ) as bar,
        _ctrl_c_sets(cancel),
    ):
        return trainer.train(progress=lambda update: _show(update, bar), cancel=cancel)


def _show(update: TrainingProgress, bar: Any) -> None:
    """Show one training progress report on the bar (validation results as a line on stdout)."""
    if update.stage == "train":
        bar.set_description("training", refresh=False)
        bar.set_postfix(loss=f"{update.loss:.4f}", lr=f"{update.lr:.2e}", refresh=False)
        bar.update(update.step - bar.n)
    elif update.stage == "validate" and update.metrics:
        bar.set_description("training", refresh=False)
        bar.write(_validation_line(update.step, update.metrics), file=sys.stdout)
    elif update.stage == "validate":
        bar.set_description(update.message)
    elif not bar.disable:
        bar.write(update.message, file=sys.stderr)


def _validation_line(step: int, metrics: dict[str, float]) -> str:
    return f"step {step}: validation {_dice_text(metrics)}"


def _dice_text(metrics: dict[str, float]) -> str:
    """``mean Dice 0.8123 (dice_breast 0.9012, dice_lesion 0.7234)``."""
    from napari_mamba_seg.training.evaluation import MEAN_DICE

    per_class = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key.startswith("dice_"))
    return f"mean Dice {metrics.get(MEAN_DICE, math.nan):.4f} ({per_class})"


def _print_outcome(result: Any, trainer: Trainer) -> None:
    """The best bundle and its metrics, and the last checkpoint."""
    if result.stopped_early:
        print(
            f"stopped early at step {result.step}: {trainer.config.early_stopping_patience} validation(s) in a row "
            "without improvement"
        )
    if result.best_bundle is not None:
        step = result.best_metrics.get("step", "?")
        print(f"best bundle: {result.best_bundle} (step {step}): {_dice_text(result.best_metrics)}")
    else:
        print("no validation cases, so no best bundle: use the last checkpoint")
    if result.last_checkpoint is not None:
        print(f"last checkpoint: {result.last_checkpoint} (step {result.step})")


def _checkpoint_note(output: Path, args: argparse.Namespace) -> str:
    """Where the last good checkpoint is and how to continue from it (or that none was written)."""
    from napari_mamba_seg.bundles import CARD_FILE, read_card
    from napari_mamba_seg.training import LAST

    folder = output / LAST
    if not (folder / CARD_FILE).is_file():
        return f"no checkpoint was written to {output} yet"
    try:
        step = read_card(folder).metrics.get("step", "?")
    except ValueError:
        step = "?"
    return (
        f"the last checkpoint is {folder} (step {step}); continue with: napari-mamba-seg train {args.dataset} "
        f"-o {output} --resume"
    )


# -------------------------------------------------------------------------------------------------------- evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a bundle on a data set and print (and optionally write as CSV) the metrics table.

    Returns:
        0 when every case was evaluated, 1 when the evaluation or the CSV failed, 2 when it could not start, 130
        when interrupted (nothing is written).
    """
    from napari_mamba_seg.inference.files import USER_ERRORS

    try:
        predictor, cases = _prepare_evaluation(args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was evaluated", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    try:
        result = _evaluate_with_progress(predictor, cases, args)
        rows = evaluation_rows(result, hd95=args.hd95)
        print(format_evaluation_table(rows))
        if args.csv:
            print(f"wrote {write_csv(rows, args.csv, overwrite=args.overwrite)}")
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        if args.debug:
            raise
        print(_unexpected(error), file=sys.stderr)
        return 1
    return 0


def _prepare_evaluation(args: argparse.Namespace) -> tuple[Predictor, NnUNetRawDataset]:
    from napari_mamba_seg.inference import PredictionSettings, Predictor
    from napari_mamba_seg.training import NnUNetRawDataset

    if args.csv and Path(args.csv).exists() and not args.overwrite:
        raise FileExistsError(f"--csv {args.csv} exists; pass --overwrite to replace it, or choose another file")
    dataset = NnUNetRawDataset(args.dataset)
    if args.cases:
        unknown = [name for name in args.cases if name not in dataset.case_names]
        if unknown:
            raise ValueError(
                f"--cases {', '.join(unknown)}: no such case(s) in {dataset.folder}; its cases are "
                f"{_listing(dataset.case_names)}"
            )
        dataset = _subset(dataset, args.cases)
    predictor = Predictor.from_bundle(args.model, PredictionSettings(device=args.device))
    _check_predictor_fits(predictor, args.model, dataset)
    return predictor, dataset


def _check_predictor_fits(predictor: Predictor, source: str, dataset: NnUNetRawDataset) -> None:
    json_file = dataset.folder / "dataset.json"
    channels = predictor.model.in_channels
    if channels != len(dataset.channel_names):
        raise ValueError(
            f"model {source} takes {channels} input channel(s) but {json_file} has {len(dataset.channel_names)} "
            f"({', '.join(dataset.channel_names)}); evaluate a model made for these channels"
        )
    if predictor.num_classes != dataset.num_classes:
        raise ValueError(
            f"model {source} predicts {predictor.num_classes} classes ({', '.join(predictor.class_names)}) but "
            f"{json_file} has {dataset.num_classes} ({', '.join(dataset.class_names)}); the labels must use the "
            "model's classes"
        )
    _warn_if_names_differ("class", predictor.class_names, dataset.class_names, source, json_file)


def _evaluate_with_progress(predictor: Predictor, cases: NnUNetRawDataset, args: argparse.Namespace) -> Any:
    from tqdm import tqdm

    from napari_mamba_seg.training import iter_evaluate

    steps = iter_evaluate(predictor, cases, compute_hd95=args.hd95)
    with tqdm(total=len(cases), unit="case", desc="evaluating", file=sys.stderr, disable=args.quiet) as bar:
        while True:
            try:
                case = next(steps)
            except StopIteration as finished:
                return finished.value
            bar.set_postfix_str(case.name, refresh=False)
            bar.update()


def evaluation_rows(result: EvaluationResult, *, hd95: bool = False) -> list[list[Any]]:
    """The evaluation table: a header, one row per case, the mean row.

    Args:
        result: What :func:`napari_mamba_seg.training.evaluate` returned.
        hd95: Add the ``hd95_<class>`` columns.

    Returns:
        ``[header, *case_rows, mean_row]``: the header is ``case``, ``dice_<class>`` per foreground class,
        ``mean_dice`` and (with ``hd95``) ``hd95_<class>``; every other row holds the case name (``"mean"``) and
        floats (``nan`` where undefined). A case row's ``mean_dice`` is the mean of its defined class Dice values;
        the mean row holds the per-class means over the cases and ``mean_dice`` = the mean of those.
    """
    import numpy as np

    from napari_mamba_seg.training.evaluation import MEAN_DICE

    foreground = list(result.class_names[1:])
    header = ["case", *(f"dice_{name}" for name in foreground), MEAN_DICE]
    if hd95:
        header += [f"hd95_{name}" for name in foreground]
    rows: list[list[Any]] = [header]
    for case in result.cases:
        dice = [float(v) for v in case.dice[1:]]
        defined = [v for v in dice if not math.isnan(v)]
        row = [case.name, *dice, float(np.mean(defined)) if defined else math.nan]
        if hd95:
            distances = case.hd95 if case.hd95 is not None else np.full(len(case.dice), np.nan)
            row += [float(v) for v in distances[1:]]
        rows.append(row)
    rows.append(["mean", *(float(result.metrics.get(column, math.nan)) for column in header[1:])])
    return rows


def format_evaluation_table(rows: Sequence[Sequence[Any]]) -> str:
    """The :func:`evaluation_rows` table as plain text: Dice with 4 decimals, HD95 (mm) with 2."""
    cells = [[_text_cell(value, column) for value, column in zip(row, rows[0], strict=True)] for row in rows[1:]]
    return format_table([list(rows[0]), *cells])


def _text_cell(value: Any, column: str) -> str:
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if column.startswith("hd95_") else f"{value:.4f}"


def write_csv(rows: Sequence[Sequence[Any]], path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a table as CSV (floats at full precision, ``nan``/``inf`` as such), atomically.

    Args:
        rows: The header, then the rows (strings and floats).
        path: The CSV file; its folder is created.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        FileExistsError: The file exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it, or choose another file")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name for --csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for row in rows:
        writer.writerow([cell if isinstance(cell, str) else repr(float(cell)) for cell in row])
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        temporary.write_text(text.getvalue(), encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------- helpers


def _unexpected(error: BaseException) -> str:
    return (
        f"error: unexpected {type(error).__name__}: {_one_line(error)} (a bug: please report it; --debug shows the "
        "traceback)"
    )


def _or_default(value: Any, default: Any) -> Any:
    """``value`` when the option was given (even 0), else ``default``."""
    return default if value is None else value


def _listing(names: Sequence[str], count: int = 20) -> str:
    return ", ".join(names[:count]) + (f", ... ({len(names)} in all)" if len(names) > count else "")


def _flags(options: dict[str, str]) -> list[str]:
    return [f"--{name.replace('_', '-')}" for name in options]
