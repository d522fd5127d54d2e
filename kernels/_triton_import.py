"""Import Triton safely in a process that already draws with OpenGL (napari).

With Mesa (llvmpipe under Xvfb, and most Intel/AMD Linux desktops) the OpenGL driver loads the system
``libLLVM`` into the process with global symbols. Triton's ``libtriton.so`` carries its own LLVM; loaded
afterwards, its static initialisers bind to the system libLLVM's symbols and the process dies with
SIGSEGV (in ``llvm::cl::Option::addArgument``). Loading it with ``RTLD_DEEPBIND`` makes libtriton use
its own copies. Importing triton *before* any OpenGL context exists is fine, which is why the crash
only shows in napari. The scan engine calls :func:`import_triton_isolated` before every import of triton
(its Triton backend, and mamba_ssm, which imports triton), so no caller needs to remember it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def foreign_llvm_loaded() -> bool:
    """Whether a shared ``libLLVM`` (Mesa's) is mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def import_triton_isolated() -> bool:
    """Import ``triton`` with ``RTLD_DEEPBIND`` when a foreign libLLVM is loaded.

    Does nothing if triton is already imported, not installed, not on Linux, or no libLLVM is
    loaded (a plain import is safe then). Import errors are swallowed: the scan engine reports why
    its Triton backend is unavailable.

    Returns:
        True if this call imported triton with ``RTLD_DEEPBIND``.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    if importlib.util.find_spec("triton") is None or not foreign_llvm_loaded():
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:
        return False
    finally:
        sys.setdlopenflags(flags)
    return True
