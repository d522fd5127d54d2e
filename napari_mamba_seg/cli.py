"""Command line entry point ``napari-mamba-seg``.

Subcommands:
    demo      open napari with the plugin's widgets docked
    backends  print which selective-scan backends this machine can run
    models    list the registered architectures and the bundled model bundles

Heavy imports (torch, napari, Qt) happen inside the subcommands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from napari_mamba_seg import __version__

PLUGIN_NAME = "napari-mamba-seg"


def _plugin_widget_names() -> list[str]:
    """Display names of every widget the plugin's manifest contributes, in manifest order."""
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN_NAME)
    return [widget.display_name for widget in manifest.contributions.widgets or []]


def run_demo(args: argparse.Namespace) -> int:
    """Open a napari viewer with all of the plugin's widgets docked, and run the Qt event loop."""
    import napari

    viewer = napari.Viewer(title="napari-mamba-seg demo")
    for widget_name in _plugin_widget_names():
        viewer.window.add_plugin_dock_widget(PLUGIN_NAME, widget_name)
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


def format_models_listing(architectures: Sequence[Sequence[str]], bundled: Sequence[Sequence[str]]) -> str:
    """The text ``napari-mamba-seg models`` prints.

    Args:
        architectures: ``(name, "2D" or "3D", description)`` per registered architecture.
        bundled: ``(name, architecture, modality, class names)`` per bundled bundle.
    """
    lines = ["Architectures (napari_mamba_seg.models.create_model):"]
    lines.append(format_table([("name", "dims", "description"), *architectures]) if architectures else "  none")
    lines += ["", "Bundled model bundles (napari_mamba_seg.bundles.load_bundle by name):"]
    if bundled:
        lines.append(format_table([("name", "architecture", "modality", "classes"), *bundled]))
    else:
        lines.append("  none: this installation ships no bundled weights; load a bundle folder of your own")
    return "\n".join(lines)


def _bundled_rows() -> list[tuple[str, str, str, str]]:
    """One row per bundled bundle, read from its card (an unreadable card is shown with the reason)."""
    from napari_mamba_seg.bundles import list_bundled, read_card

    rows = []
    for name in list_bundled():
        try:
            card = read_card(name)
        except ValueError as error:
            rows.append((name, "unreadable", str(error), ""))
            continue
        rows.append((name, card.architecture, card.modality or "-", ", ".join(card.class_names)))
    return rows


def run_models(args: argparse.Namespace) -> int:
    """Print the registered architectures and the bundled bundles (imports torch; builds no model)."""
    from napari_mamba_seg.models import get_model_entry, list_models

    entries = [get_model_entry(name) for name in list_models(include_test=args.include_test)]
    architectures = [(entry.name, f"{entry.spatial_dims}D", entry.description) for entry in entries]
    print(format_models_listing(architectures, _bundled_rows()))
    return 0


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
        help="open napari with the plugin's widgets docked",
        description="Open a napari window with every widget of the napari-mamba-seg plugin docked.",
    )
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
