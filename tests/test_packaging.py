"""Packaging: the wheel installs into a fresh environment and works there without the source tree.

The slow tests build a wheel from a copy of the checkout, create a fresh venv, install the wheel with
``--no-deps``, and borrow torch / numpy / numba / npe2 from the test environment through a ``.pth``
file. A path added by a ``.pth`` file is not itself scanned for ``.pth`` files, so the editable
install of the test environment (an import hook started from a ``.pth`` file) stays inactive there;
``test_editable_install_does_not_leak`` checks that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".whl", ".gl"
)


def _source_packages() -> set[str]:
    """Package names (directories with ``__init__.py``) under every ``package-dir`` root."""
    found = set()
    for package, directory in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        root = REPO_ROOT / directory
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            if "__pycache__" not in parts:
                found.add(".".join((package, *parts)))
    return found


def test_every_source_package_is_listed() -> None:
    """pyproject.toml lists packages explicitly (kernels/ and weights/ are mapped); none may be missing."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = sorted(_source_packages() - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def _copy_checkout(destination: Path) -> Path:
    """Copy the files a clean clone would have (tracked + untracked, not ignored); fall back to a filtered copy."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO_ROOT, destination, ignore=COPY_IGNORE, symlinks=True)
        return destination
    for raw in filter(None, listed):
        relative = Path(os.fsdecode(raw))
        source = REPO_ROOT / relative
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = _copy_checkout(tmp_path_factory.mktemp("source") / "napari-mamba-seg")
    outdir = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (built,) = outdir.glob("napari_mamba_seg-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with only the wheel installed; the test environment's site-packages appended via .pth."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env_dir, with_pip=False, symlinks=os.name != "nt")
    python = _env_python(env_dir)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    env_site = Path(_run_in(python, "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    outer_site = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (env_site / "_outer_site_packages.pth").write_text("".join(f"{path}\n" for path in sorted(outer_site)))
    return env_dir


def _env_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run_in(python: Path, code: str) -> str:
    result = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=python.parent,  # not the checkout: the current directory is on sys.path for -c
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "napari_mamba_seg/__init__.py",
        "napari_mamba_seg/napari.yaml",
        "napari_mamba_seg/cli.py",
        "napari_mamba_seg/_napari/_backends_widget.py",
        "napari_mamba_seg/kernels/__init__.py",
        "napari_mamba_seg/kernels/reference.py",
        "napari_mamba_seg/weights/__init__.py",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    for package in _source_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"package {package} missing from the wheel"
    assert not any(name.startswith(("kernels/", "weights/", "tests/", "benchmarks/")) for name in names)
    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[napari.manifest]\nnapari-mamba-seg = napari_mamba_seg:napari.yaml" in text
    assert "[console_scripts]\nnapari-mamba-seg = napari_mamba_seg.cli:main" in text


@pytest.mark.slow
def test_editable_install_does_not_leak(fresh_env: Path) -> None:
    state = json.loads(
        _run_in(
            _env_python(fresh_env),
            """
            import json, sys
            import napari_mamba_seg
            print(json.dumps({
                "prefix": sys.prefix,
                "package": napari_mamba_seg.__file__,
                "editable_finders": [type(f).__name__ for f in sys.meta_path if "editable" in repr(f).lower()],
                "editable_modules": [m for m in sys.modules if m.startswith("__editable__")],
            }))
            """,
        )
    )
    assert Path(state["prefix"]).resolve() == fresh_env.resolve()
    assert Path(state["package"]).resolve().is_relative_to(fresh_env.resolve())
    assert state["editable_finders"] == []
    assert state["editable_modules"] == []


@pytest.mark.slow
def test_leak_check_would_catch_an_active_editable_finder(fresh_env: Path) -> None:
    """Control for the test above: processing the outer site-packages' .pth files does start the finder."""
    outer_site = Path(sysconfig.get_path("purelib"))
    if not list(outer_site.glob("__editable__*napari_mamba_seg*.pth")):
        pytest.skip("the test environment has no editable install of napari-mamba-seg")
    code = f"""
        import site, sys
        site.addsitedir({str(outer_site)!r})
        print(sum("editable" in repr(f).lower() for f in sys.meta_path))
        """
    assert int(_run_in(_env_python(fresh_env), code)) >= 1


@pytest.mark.slow
def test_installed_wheel_works(fresh_env: Path) -> None:
    python = _env_python(fresh_env)
    state = json.loads(
        _run_in(
            python,
            """
            import json
            from importlib import resources
            import torch
            import napari_mamba_seg.kernels as kernels
            from npe2 import PluginManifest
            from napari_mamba_seg.kernels import selective_scan

            manifest_file = resources.files("napari_mamba_seg") / "napari.yaml"
            manifest = PluginManifest.from_distribution("napari-mamba-seg")
            torch.manual_seed(0)
            b, d, n, l = 1, 3, 4, 5
            u, delta = torch.randn(b, d, l), torch.rand(b, d, l)
            A, B, C, D = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l), torch.randn(d)
            out = selective_scan(u, delta, A, B, C, D, backend="reference")
            print(json.dumps({
                "kernels": kernels.__file__,
                "manifest_file": str(manifest_file),
                "manifest_is_file": manifest_file.is_file(),
                "manifest_name": manifest.name,
                "widgets": [w.display_name for w in manifest.contributions.widgets or []],
                "scan_shape": list(out.shape),
                "scan_finite": bool(torch.isfinite(out).all()),
            }))
            """,
        )
    )
    env = fresh_env.resolve()
    assert Path(state["kernels"]).resolve().is_relative_to(env), state["kernels"]
    assert Path(state["manifest_file"]).resolve().is_relative_to(env), state["manifest_file"]
    assert state["manifest_is_file"]
    assert state["manifest_name"] == "napari-mamba-seg"
    assert "Scan backends" in state["widgets"]
    assert state["scan_shape"] == [1, 3, 5]
    assert state["scan_finite"]


@pytest.mark.slow
def test_installed_console_script(fresh_env: Path) -> None:
    script = fresh_env / ("Scripts/napari-mamba-seg.exe" if os.name == "nt" else "bin/napari-mamba-seg")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "backends" in result.stdout and "demo" in result.stdout
