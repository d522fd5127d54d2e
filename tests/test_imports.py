"""Import hygiene: a cheap top-level import, a core that never touches napari or Qt, and a manifest
whose every ``python_name`` imports."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = REPO_ROOT / "napari_mamba_seg" / "napari.yaml"

GUI_MODULES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")
# Only these may import napari / Qt (DESIGN.md: imports point one way).
FRONT_END = ("napari_mamba_seg._napari", "napari_mamba_seg.cli")
# Optional GPU packages: a module whose import needs one of them is reported, not failed, where it is missing.
OPTIONAL = ("mamba_ssm", "causal_conv1d", "triton")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600, check=False
    )


def _core_modules() -> list[str]:
    """Every module of the distribution except the front end, found on disk (nothing is imported).

    The package directories come from pyproject.toml's ``package-dir`` mapping, so
    ``kernels/`` is walked as ``napari_mamba_seg.kernels``.
    """
    setuptools_config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = setuptools_config["package-dir"]
    modules = set()
    for package, directory in package_dirs.items():
        root = REPO_ROOT / directory
        for init in root.rglob("__init__.py"):
            package_path = init.parent
            parts = package_path.relative_to(root).parts
            package_name = ".".join((package, *parts))
            modules.add(package_name)
            modules.update(f"{package_name}.{py.stem}" for py in package_path.glob("*.py") if py.stem != "__init__")
    return sorted(
        module
        for module in modules
        if not any(module == front or module.startswith(front + ".") for front in FRONT_END)
        and not {"tests", "_tests"} & set(module.split("."))
    )


def test_top_level_import_is_light() -> None:
    """``import napari_mamba_seg`` must not import torch, numba, napari or Qt (napari starts fast)."""
    heavy = ("torch", "numba", *GUI_MODULES)
    result = _run_python(
        f"""
        import json, sys
        import napari_mamba_seg
        print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], "importing napari_mamba_seg pulled in heavy modules"


def test_lazy_api_resolves() -> None:
    """Every lazily exported name resolves to the object its module defines."""
    import napari_mamba_seg

    lazy = napari_mamba_seg._LAZY_API
    assert set(napari_mamba_seg.__all__) == {"__version__", *lazy}
    for name, module_name in lazy.items():
        assert getattr(napari_mamba_seg, name) is getattr(importlib.import_module(module_name), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = napari_mamba_seg.no_such_name


def test_core_never_imports_napari_or_qt() -> None:
    """Import each core module and record which GUI modules its import added to ``sys.modules``.

    One subprocess imports the modules one after another (fresh processes per module would cost a
    torch import each). Modules never leave ``sys.modules``, so the module whose import first brings in
    a GUI package is exactly the one that (directly or through its imports) imports it.
    """
    modules = _core_modules()
    assert "napari_mamba_seg.kernels" in modules
    result = _run_python(
        f"""
        import importlib, json, sys, traceback
        gui, optional = {GUI_MODULES!r}, {OPTIONAL!r}
        report = {{}}
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as error:
                if (error.name or "").split(".")[0] in optional:
                    report[name] = {{"optional_missing": error.name}}
                    continue
                report[name] = {{"error": traceback.format_exc()}}
                continue
            except Exception:
                report[name] = {{"error": traceback.format_exc()}}
                continue
            leaked = [m for m in gui if m in sys.modules]
            if leaked:
                report[name] = {{"gui": leaked}}
                break
        print(json.dumps(report))
        """
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    errors = {name: entry["error"] for name, entry in report.items() if "error" in entry}
    assert not errors, "core modules failed to import:\n" + "\n".join(f"{n}:\n{e}" for n, e in errors.items())
    leaks = {name: entry["gui"] for name, entry in report.items() if "gui" in entry}
    assert not leaks, f"core module imports napari/Qt (only {FRONT_END} may): {leaks}"


def _manifest_python_names() -> list[str]:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    return [command.python_name for command in manifest.contributions.commands or [] if command.python_name]


@pytest.mark.parametrize("python_name", _manifest_python_names())
def test_manifest_python_name_importable(python_name: str) -> None:
    """Every command's ``python_name`` (``module:attribute``) imports and resolves to a callable."""
    module_name, _, attribute = python_name.partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attribute)), python_name
