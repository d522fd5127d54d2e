"""The correction core is pure arrays: importing it pulls in neither torch nor napari, Qt or magicgui."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY_MODULES = ("torch", "napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy")


def test_importing_the_interactive_core_imports_no_torch_napari_or_qt() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import napari_mamba_seg.interactive as interactive
        assert 'torch' not in sys.modules and 'napari' not in sys.modules
        for name in interactive.__all__:
            getattr(interactive, name)
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r})
        print(loaded)
        assert not loaded, loaded
        """
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
