"""The selective-scan engine: one dispatcher over a reference and fast backends.

``selective_scan`` has the signature and semantics of mamba_ssm's ``selective_scan_fn``;
``backend`` picks the implementation:

- ``reference``: pure PyTorch in float64, sequential, the oracle (``reference.py``);
- ``cpu``: fused numba kernels, forward and backward, multi-threaded (``cpu.py``);
- ``triton``: Triton kernels for CUDA GPUs (``triton_scan.py``);
- ``mamba_ssm``: mamba_ssm's CUDA kernel when installed (``mamba_ssm_backend.py``).
"""

from napari_mamba_seg.kernels.dispatch import (
    BACKEND_ENV_VAR,
    BACKENDS,
    available_backends,
    resolve_backend,
    selective_scan,
)
from napari_mamba_seg.kernels.reference import selective_scan_reference

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "available_backends",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
]
