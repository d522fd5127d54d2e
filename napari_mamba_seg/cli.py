"""Command line entry point ``napari-mamba-seg``.

Subcommands:
    demo      open napari with the plugin's widgets docked
    backends  print which selective-scan backends this machine can run

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
