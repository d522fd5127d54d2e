"""napari front end: the only part of the package that imports napari, magicgui, qtpy or superqt.

Each contribution in ``napari.yaml`` lives in its own private module, imported by napari only
when the contribution is used, so starting napari does not import torch.

A plain ``import triton`` after napari has created its OpenGL context crashes the process on
Mesa; the scan engine imports triton through ``napari_mamba_seg.kernels._triton_import``, which
avoids that, so code here must not import triton (or mamba_ssm) directly.
"""

import os

# Before anything here imports torch: torch's OpenMP threads and numba's scan threads spin-wait against each other
# on small machines (see napari_mamba_seg.cli.configure_runtime); a user's own value is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
