"""The npe2 manifest: valid (what ``npe2 validate napari-mamba-seg`` checks), found through the
installed distribution's entry point, and cheap for napari to load."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from npe2 import PluginManifest

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = REPO_ROOT / "napari_mamba_seg" / "napari.yaml"
PLUGIN = "napari-mamba-seg"


def test_manifest_file_is_valid() -> None:
    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == PLUGIN
    assert manifest.display_name == "Mamba Segmentation"


def test_manifest_found_through_distribution_and_imports_resolve() -> None:
    """The same checks as ``npe2 validate --imports napari-mamba-seg``."""
    manifest = PluginManifest.from_distribution(PLUGIN)
    assert manifest.name == PLUGIN
    assert manifest.package_metadata is not None
    assert manifest.package_metadata.name == PLUGIN
    spec = importlib.util.find_spec("napari_mamba_seg")
    assert spec is not None
    assert [Path(p).resolve() for p in spec.submodule_search_locations] == [MANIFEST.parent.resolve()]
    manifest.validate_imports()


def test_widgets_point_at_declared_commands() -> None:
    manifest = PluginManifest.from_file(MANIFEST)
    command_ids = {command.id for command in manifest.contributions.commands or []}
    widgets = manifest.contributions.widgets or []
    assert "Scan backends" in {widget.display_name for widget in widgets}
    for widget in widgets:
        assert widget.command in command_ids, f"widget {widget.display_name!r} uses unknown {widget.command!r}"


def test_root_manifest_is_a_symlink_to_the_package_manifest() -> None:
    root_manifest = REPO_ROOT / "napari.yaml"
    assert root_manifest.is_symlink(), "napari.yaml at the repository root must be a symlink"
    assert root_manifest.resolve() == MANIFEST.resolve()


def test_napari_plugin_discovery_does_not_import_torch() -> None:
    """napari reads the manifest at start-up; torch may only be imported when a widget is created.

    (numba is not checked: napari imports it itself.)
    """
    code = f"""
        import json, sys
        from napari.plugins import _initialize_plugins
        from npe2 import PluginManager
        _initialize_plugins()
        manager = PluginManager.instance()
        print(json.dumps({{
            "registered": {PLUGIN!r} in manager,
            "heavy": [m for m in ("torch", "napari_mamba_seg.kernels") if m in sys.modules],
        }}))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state == {"registered": True, "heavy": []}


FAKE_BACKENDS = {"reference": None, "cpu": None, "triton": "no CUDA device", "mamba_ssm": "mamba_ssm is not installed"}


def _dock_backends_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Scan backends")
    return viewer, widget


@pytest.mark.gui
def test_backends_widget_through_manifest(make_napari_viewer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opened from the manifest like napari's Plugins menu does; shows what available_backends() says."""
    monkeypatch.setattr("napari_mamba_seg.kernels.available_backends", lambda: dict(FAKE_BACKENDS), raising=False)
    viewer, widget = _dock_backends_widget(make_napari_viewer)
    assert "Scan backends" in " ".join(viewer.window.dock_widgets)
    assert widget.rows() == [
        ("reference", "available", ""),
        ("cpu", "available", ""),
        ("triton", "unavailable", "no CUDA device"),
        ("mamba_ssm", "unavailable", "mamba_ssm is not installed"),
    ]
    assert widget.summary.text().startswith("2 of 4")

    FAKE_BACKENDS["cpu"] = "numba is broken"
    try:
        widget.refresh_button.click()
    finally:
        FAKE_BACKENDS["cpu"] = None
    assert widget.rows()[1] == ("cpu", "unavailable", "numba is broken")


@pytest.mark.gui
def test_backends_widget_reports_a_failing_engine(make_napari_viewer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, str | None]:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr("napari_mamba_seg.kernels.available_backends", broken, raising=False)
    _viewer, widget = _dock_backends_widget(make_napari_viewer)
    assert widget.rows() == []
    assert "engine exploded" in widget.summary.text()


@pytest.mark.gui
def test_backends_widget_on_this_machine(make_napari_viewer) -> None:
    """The real engine: the reference backend is listed as available."""
    _viewer, widget = _dock_backends_widget(make_napari_viewer)
    rows = {name: status for name, status, _reason in widget.rows()}
    assert rows.get("reference") == "available", widget.summary.text()


@pytest.mark.gui
def test_backends_widget_after_opengl_in_a_fresh_process() -> None:
    """Real start-up order: napari creates its OpenGL context, then the widget makes the engine import triton.

    On Mesa a plain triton import at that point kills the process (SIGSEGV); the widget must not.
    Runs in a subprocess because this test process may have imported triton already.
    """
    code = f"""
        import json, sys
        import napari
        from qtpy.QtWidgets import QApplication
        viewer = napari.Viewer(show=True)
        QApplication.processEvents()
        _dock, widget = viewer.window.add_plugin_dock_widget({PLUGIN!r}, "Scan backends")
        state = {{"rows": widget.rows(), "summary": widget.summary.text(), "triton": "triton" in sys.modules}}
        viewer.close()
        print(json.dumps(state))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    state = json.loads(result.stdout.strip().splitlines()[-1])
    statuses = {name: status for name, status, _reason in state["rows"]}
    assert statuses.get("reference") == "available", state
    assert "triton" in statuses, state
