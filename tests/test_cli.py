"""The ``napari-mamba-seg`` console script: help, ``backends``, ``models`` and ``demo``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from napari_mamba_seg import __version__, cli

FAKE_BACKENDS = {"reference": None, "cpu": None, "triton": "no CUDA device", "mamba_ssm": "mamba_ssm is not installed"}


def _script() -> Path:
    script = Path(sys.executable).parent / "napari-mamba-seg"
    assert script.exists(), f"console script missing at {script}; reinstall with `pip install -e '.[test]'`"
    return script


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_script(), *args], capture_output=True, text=True, timeout=300, check=False)


def test_help_lists_every_subcommand() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: napari-mamba-seg" in result.stdout
    for subcommand in ("demo", "backends", "models", "predict"):
        assert subcommand in result.stdout
    for subcommand in ("demo", "backends", "models", "predict"):
        sub = _run(subcommand, "--help")
        assert sub.returncode == 0, sub.stderr
        assert f"usage: napari-mamba-seg {subcommand}" in sub.stdout


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"napari-mamba-seg {__version__}"


def test_no_subcommand_is_an_error() -> None:
    result = _run()
    assert result.returncode == 2
    assert "required" in result.stderr


def test_help_does_not_import_heavy_modules() -> None:
    code = """
        import json, sys
        from napari_mamba_seg import cli
        try:
            cli.main(["--help"])
        except SystemExit:
            pass
        print(json.dumps([m for m in ("torch", "numba", "napari", "qtpy") if m in sys.modules]))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_backends_table_format() -> None:
    table = cli.format_backends_table(FAKE_BACKENDS).splitlines()
    assert table[0].split() == ["backend", "status", "reason"]
    assert table[1].split() == ["reference", "available"]
    assert table[3].split()[:2] == ["triton", "unavailable"]
    assert table[3].endswith("no CUDA device")
    assert len(table) == 1 + len(FAKE_BACKENDS)


def test_backends_prints_what_available_backends_returns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("napari_mamba_seg.kernels.available_backends", lambda: dict(FAKE_BACKENDS), raising=False)
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == cli.format_backends_table(FAKE_BACKENDS)


def test_backends_on_this_machine() -> None:
    """The real engine: the pure-torch reference backend is available everywhere."""
    result = _run("backends")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:] if line.strip()}
    assert lines.get("reference") == "available", result.stdout


def test_models_lists_architectures_and_bundled_bundles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_mamba_seg import bundles
    from napari_mamba_seg.models import create_model, get_model_entry, list_models

    name = list_models("test_", include_test=True)[0]
    card = bundles.ModelCard(modality="breast DCE-MRI", class_names=["background", "lesion"])
    bundles.save_bundle(create_model(name, num_classes=2), tmp_path / "breast_demo", card)
    monkeypatch.setattr(bundles, "_bundled_root", lambda: tmp_path)

    assert cli.main(["models", "--include-test"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    for architecture in list_models(include_test=True):
        assert rows[architecture][1] == f"{get_model_entry(architecture).spatial_dims}D", out
    line = next(line for line in out.splitlines() if line.startswith("breast_demo"))
    assert line.split()[1] == name, out
    assert line.endswith(f"{name} | 1 ch -> background, lesion | breast DCE-MRI"), out


def test_models_on_this_machine() -> None:
    """The console script lists the full-size architectures (not the test_ variants) and the bundled bundles."""
    from napari_mamba_seg.bundles import list_bundled
    from napari_mamba_seg.models import list_models

    result = _run("models")
    assert result.returncode == 0, result.stderr
    first_words = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert set(list_models()) <= set(first_words), result.stdout
    assert not any(word.startswith("test_") for word in first_words), result.stdout
    if list_bundled():
        assert set(list_bundled()) <= set(first_words), result.stdout
    else:
        assert "ships no bundled weights" in result.stdout


def test_format_table_pads_all_but_the_last_column() -> None:
    table = cli.format_table([("name", "dims", "description"), ("vm_unet", "2D", "VM-UNet")]).splitlines()
    assert table == ["name     dims  description", "vm_unet  2D    VM-UNet"]


@pytest.mark.gui
def test_demo_opens_the_sample_and_docks_segment_and_correct(make_napari_viewer, monkeypatch) -> None:
    """``napari-mamba-seg demo``: the phantom's three phases and ground truth, the demo widgets docked (event loop
    not started)."""
    import napari

    viewers = []

    def make_viewer(**kwargs):
        viewers.append(make_napari_viewer(**kwargs))
        return viewers[-1]

    monkeypatch.setattr(napari, "Viewer", make_viewer)
    assert cli.main(["demo", "--no-event-loop"]) == 0
    (viewer,) = viewers
    docked = " ".join(viewer.window.dock_widgets)
    assert "Segment" in cli.demo_widget_names()
    for widget_name in cli.demo_widget_names():
        assert widget_name in docked
    kinds = [layer._type_string for layer in viewer.layers]
    assert kinds == ["image", "image", "image", "labels"]
    assert viewer.layers[0].data.shape == (60, 256, 256)
