"""Command line entry point ``napari-mamba-seg``.

Subcommands:
    demo      open napari with the breast phantom sample and the Segment and Correct widgets docked
    backends  print which selective-scan backends this machine can run
    models    list the registered architectures, the bundled and the user's model bundles
    predict   segment NIfTI/TIFF files and DICOM folders with a model bundle
    train     train or fine-tune a model on an nnU-Net v2 raw data set folder (napari_mamba_seg._cli_training)
    finetune  fine-tune a model bundle on corrected, reviewed slices of studies (napari_mamba_seg._cli_finetune)
    evaluate  per-case and mean Dice (and HD95) of a model bundle on an nnU-Net v2 raw data set folder
    export    export corrected labels as NIfTI, TIFF, DICOM-SEG or an nnU-Net case (napari_mamba_seg._cli_export)

Heavy imports (torch, napari, Qt) happen inside the subcommands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_mamba_seg import __version__

if TYPE_CHECKING:
    from napari_mamba_seg.inference.files import FileJob

PLUGIN_NAME = "napari-mamba-seg"


DEMO_SAMPLE = "breast_dce_phantom"
DEMO_WIDGETS = ("Segment", "Fine-tune", "Export", "Correct")
"""Widgets docked by ``demo`` (those the manifest has), in this order; the others stay in the Plugins menu."""


def _plugin_widget_names() -> list[str]:
    """Display names of every widget the plugin's manifest contributes, in manifest order."""
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN_NAME)
    return [widget.display_name for widget in manifest.contributions.widgets or []]


def demo_widget_names() -> list[str]:
    """The widgets ``demo`` docks: :data:`DEMO_WIDGETS` that the manifest contributes."""
    available = _plugin_widget_names()
    return [name for name in DEMO_WIDGETS if name in available]


def dock_demo_widgets(viewer: Any) -> dict[str, Any]:
    """Dock the demo widgets: Segment above Fine-tune, Export and Correct, which share a place as tabs (the last one
    docked, Correct, in front). Name -> widget."""
    widgets = {}
    for index, name in enumerate(demo_widget_names()):
        widgets[name] = viewer.window.add_plugin_dock_widget(PLUGIN_NAME, name, tabify=index >= 2)[1]
    return widgets


def run_demo(args: argparse.Namespace) -> int:
    """Open napari with the breast phantom sample loaded and the Segment and Correct widgets docked."""
    import napari

    viewer = napari.Viewer(title="napari-mamba-seg demo")
    if not args.no_sample:
        viewer.open_sample(PLUGIN_NAME, DEMO_SAMPLE)
    dock_demo_widgets(viewer)
    if not args.no_event_loop:
        napari.run()
    return 0


def format_backends_table(backends: dict[str, str | None]) -> str:
    """A plain-text table of selective-scan backends.

    Args:
        backends: Backend name -> ``None`` if available, else the reason it is not.

    Returns:
        One header line and one line per backend: name, status, reason.
    """
    rows = [("backend", "status", "reason")]
    rows += [
        (name, "available" if reason is None else "unavailable", reason or "") for name, reason in backends.items()
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    lines = [f"{name:<{widths[0]}}  {status:<{widths[1]}}  {reason}".rstrip() for name, status, reason in rows]
    return "\n".join(lines)


def run_backends(args: argparse.Namespace) -> int:
    """Print the table of selective-scan backends (imports torch)."""
    from napari_mamba_seg.kernels import available_backends

    print(format_backends_table(dict(available_backends())))
    return 0


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: every column but the last padded to its widest cell, two spaces apart.

    Args:
        rows: The header row, then one row per line; all rows have the same number of cells.
    """
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_models_listing(
    architectures: Sequence[Sequence[str]],
    bundled: Sequence[Sequence[str]],
    user: Sequence[Sequence[str]] = (),
    user_root: str = "",
) -> str:
    """The text ``napari-mamba-seg models`` prints.

    Args:
        architectures: ``(name, "2D" or "3D", description)`` per registered architecture.
        bundled: ``(name, one-line card summary)`` per bundled bundle.
        user: ``(name, one-line card summary)`` per bundle in the user's bundle folder.
        user_root: That folder, shown in the heading.
    """
    lines = ["Architectures (napari_mamba_seg.models.create_model):"]
    lines.append(format_table([("name", "dims", "description"), *architectures]) if architectures else "  none")
    lines += ["", "Bundled model bundles (use the name with --model or load_bundle):"]
    if bundled:
        lines.append(format_table([("name", "summary"), *bundled]))
    else:
        lines.append("  none: this installation ships no bundled weights; load a bundle folder of your own")
    lines += ["", f"Your model bundles (in {user_root}; use the name with --model or load_bundle):"]
    lines.append(format_table([("name", "summary"), *user]) if user else "  none")
    return "\n".join(lines)


def _bundle_rows(names: Sequence[str]) -> list[tuple[str, str]]:
    """One ``(name, card summary)`` row per bundle name (an unreadable card is shown with the reason)."""
    from napari_mamba_seg.bundles import read_card

    rows = []
    for name in names:
        try:
            rows.append((name, read_card(name).summary()))
        except ValueError as error:
            rows.append((name, f"unreadable: {error}"))
    return rows


def run_models(args: argparse.Namespace) -> int:
    """Print the registered architectures, the bundled bundles and the user's bundles (imports torch)."""
    from napari_mamba_seg.bundles import list_bundled, list_user_bundles, user_bundle_root
    from napari_mamba_seg.models import get_model_entry, list_models

    entries = [get_model_entry(name) for name in list_models(include_test=args.include_test)]
    architectures = [(entry.name, f"{entry.spatial_dims}D", entry.description) for entry in entries]
    bundled = _bundle_rows(list_bundled())
    user = _bundle_rows(list_user_bundles())
    print(format_models_listing(architectures, bundled, user, str(user_bundle_root())))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Segment every input with one model bundle; one line per result or error, never a traceback for user errors.

    Returns:
        0 when every input was segmented, 1 when some failed, 2 when nothing could start (bad model, no inputs),
        130 when interrupted (the file being segmented is not written).
    """
    from napari_mamba_seg.inference.files import USER_ERRORS, plan_jobs, predict_job

    try:
        predictor, jobs, unusable = _predictor_and_jobs(args, plan_jobs)
    except USER_ERRORS as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    for source, reason in unusable:
        print(_error_line(source, reason), file=sys.stderr)
    if not jobs:
        return 2
    failures = len(unusable)
    try:
        report = _review_report(args)
    except USER_ERRORS as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    for job in jobs:
        observe = None if report is None else partial(_add_review_row, report, job, args.axis)
        try:
            written = _run_job(predictor, job, args, predict_job, observe)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {job.source} was not written", file=sys.stderr)
            return 130
        except USER_ERRORS as error:
            failures += 1
            print(_error_line(job.source, error), file=sys.stderr)
            continue
        except Exception as error:
            if args.debug:
                raise
            failures += 1
            print(
                f"error: {job.source}: unexpected {type(error).__name__}: {_one_line(error)} "
                "(a bug: please report it; --debug shows the traceback)",
                file=sys.stderr,
            )
            continue
        print(" ".join(["wrote", *(str(path) for path in written)]))
    return 1 if failures else 0


def _predictor_and_jobs(
    args: argparse.Namespace, plan_jobs: Callable
) -> tuple[Any, list[FileJob], list[tuple[Path, str]]]:
    from napari_mamba_seg.inference import PredictionSettings, Predictor

    settings = PredictionSettings(
        device=args.device,
        axis=args.axis,
        tta=args.tta,
        return_probabilities=args.save_probs or args.review_report,
        batch_size=args.batch_size,
        memory_budget_mb=args.memory_budget,
    )
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    jobs, unusable = plan_jobs(args.inputs, args.output, save_probabilities=args.save_probs, output_format=args.format)
    predictor = Predictor.from_bundle(args.model, settings) if jobs else None
    return predictor, jobs, unusable


def _review_report(args: argparse.Namespace) -> Any:
    """The ``--review-report`` CSV in the output folder, or None (refused when it exists without --overwrite)."""
    if not args.review_report:
        return None
    from napari_mamba_seg._cli_review import REVIEW_REPORT_NAME, ReviewReport

    return ReviewReport(Path(args.output) / REVIEW_REPORT_NAME, overwrite=args.overwrite)


def _add_review_row(report: Any, job: FileJob, axis: str | int, image: Any, prediction: Any) -> None:
    report.add(job.source, job.labels_path, image, prediction, axis)


def _run_job(
    predictor: Any, job: FileJob, args: argparse.Namespace, predict_job: Callable, observe: Callable | None = None
) -> list[Path]:
    """Predict one job with a progress bar on stderr (unless --quiet); returns the written files."""
    options = {"series_uid": args.series, "overwrite": args.overwrite, "model_name": args.model, "observe": observe}
    if args.quiet:
        return predict_job(predictor, job, **options)
    from tqdm import tqdm

    with tqdm(total=1, desc=job.source.name, unit="step", file=sys.stderr, leave=False) as bar:
        stage = [""]

        def show(progress: Any) -> None:
            if progress.stage != stage[0]:  # one bar per stage: normalising, resampling, predicting
                stage[0] = progress.stage
                bar.reset(total=progress.total)
                bar.set_description(f"{job.source.name}: {progress.stage}", refresh=False)
            bar.n = progress.done
            bar.refresh()

        return predict_job(predictor, job, progress=show, **options)


def _error_line(source: Path, error: BaseException | str) -> str:
    """``error: <source>: <message>`` on one line (the source once, even when the message names it)."""
    message = _one_line(error)
    return f"error: {message}" if str(source) in message else f"error: {source}: {message}"


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-mamba-seg`` argument parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="napari-mamba-seg",
        description="Mamba (selective state-space) segmentation networks in napari.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = subcommands.add_parser(
        "demo",
        help="open napari with the breast phantom sample and the plugin's widgets",
        description=(
            "Open napari with the synthetic breast DCE-MRI phantom loaded (three phases and the ground truth) and "
            "the Segment and Correct widgets docked; pick the breast-dce model and press Run."
        ),
    )
    demo.add_argument("--no-sample", action="store_true", help="do not load the phantom sample")
    demo.add_argument(
        "--no-event-loop",
        action="store_true",
        help="create the viewer and dock the widgets, but do not start napari's event loop (for scripts and tests)",
    )
    demo.set_defaults(handler=run_demo)

    backends = subcommands.add_parser(
        "backends",
        help="list the selective-scan backends and whether this machine can run them",
        description=(
            "Print one line per selective-scan backend (reference, cpu, triton, mamba_ssm, ...): "
            "'available', or 'unavailable' and the reason."
        ),
    )
    backends.set_defaults(handler=run_backends)

    models = subcommands.add_parser(
        "models",
        help="list the registered architectures and the bundled model bundles",
        description=(
            "Print the registered segmentation architectures (name, 2D/3D, description) and the model bundles "
            "shipped with this installation (name, architecture, expected modality, classes)."
        ),
    )
    models.add_argument(
        "--include-test", action="store_true", help="also list the tiny test_ variants used by the test suite"
    )
    models.set_defaults(handler=run_models)
    _add_predict_parser(subcommands)
    from napari_mamba_seg._cli_export import add_export_parser  # standard library only
    from napari_mamba_seg._cli_finetune import add_finetune_parser  # standard library only
    from napari_mamba_seg._cli_training import add_evaluate_parser, add_train_parser

    add_train_parser(subcommands)
    add_finetune_parser(subcommands)
    add_evaluate_parser(subcommands)
    add_export_parser(subcommands)
    return parser


def _slice_axis(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--axis must be 'auto' or an array axis (0, 1 or 2), got {text!r}") from None


def _add_predict_parser(subcommands: argparse._SubParsersAction) -> None:
    predict = subcommands.add_parser(
        "predict",
        help="segment image files or DICOM folders with a model bundle",
        description=(
            "Segment each INPUT (a NIfTI or TIFF file, a DICOM series folder, or a folder of such files) with a model "
            "bundle and write <name>_labels in the input's format (DICOM-SEG for a DICOM series) and geometry into "
            "OUTDIR. "
            "Existing files are never overwritten unless --overwrite is given. Exit status: 0 when every input was "
            "segmented, 1 when some failed (one line each on stderr), 2 for a usage error, 130 when interrupted."
        ),
    )
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    predict.add_argument(
        "--model", "-m", required=True, metavar="NAME_OR_FOLDER", help="a bundle name (see `models`) or folder"
    )
    predict.add_argument("--output", "-o", required=True, metavar="OUTDIR", help="folder for the results")
    predict.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    predict.add_argument(
        "--axis", type=_slice_axis, default="auto", help="slice axis for 2D models (default: the coarsest spacing)"
    )
    predict.add_argument("--tta", action="store_true", help="average over flipped copies (slower, smoother)")
    predict.add_argument(
        "--save-probs", action="store_true", help="also write <name>_probabilities (one channel per class, float32)"
    )
    predict.add_argument(
        "--review-report",
        action="store_true",
        help="also write OUTDIR/review.csv: per case the wrong voxels the model expects (in voxels and mL) and the "
        "slices to review first, the cases the model is least sure of first",
    )
    predict.add_argument("--batch-size", type=int, default=None, help="slices or tiles per forward (default: auto)")
    predict.add_argument(
        "--memory-budget", type=float, default=None, metavar="MB", help="memory the model may use (default: auto)"
    )
    predict.add_argument(
        "--format",
        default="auto",
        choices=("auto", ".nii.gz", ".nii", ".tif", ".dcm"),
        help="labels file format: auto = the input's (DICOM-SEG .dcm for DICOM series), or one for all inputs",
    )
    predict.add_argument("--series", default=None, metavar="UID", help="SeriesInstanceUID to read from DICOM folders")
    predict.add_argument("--overwrite", action="store_true", help="replace existing result files")
    predict.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    predict.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    predict.set_defaults(handler=run_predict)


def configure_runtime() -> None:
    """Process-wide settings that must be made before anything imports torch (a user's own values are kept).

    ``OMP_WAIT_POLICY=PASSIVE``: on a 2-core machine torch's OpenMP threads and numba's selective-scan threads
    spin-wait against each other (a tiny vm_unet training step took 0.15-9 s under load, 0.03 s with PASSIVE;
    inference on an idle machine went from 0.384 to 0.356 s per 256² VM-UNet slice).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    configure_runtime()
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
