"""mamba_ssm's CUDA selective scan, imported lazily and only when asked for.

mamba_ssm cannot even be imported without its CUDA build, so it is never imported at
module level: :func:`mamba_ssm_unavailable_reason` tries the import once and remembers
the answer.
"""

from __future__ import annotations

import functools

import torch

INSTALL_HINT = "pip install 'napari-mamba-seg[cuda]' (mamba-ssm needs Linux, an NVIDIA GPU and its CUDA build)"


@functools.cache
def _import_error() -> str | None:
    from napari_mamba_seg.kernels._triton_import import import_triton_isolated

    import_triton_isolated()  # mamba_ssm imports triton; see that module
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as error:  # a broken CUDA build raises OSError or ImportError alike
        return f"mamba_ssm is not importable ({type(error).__name__}: {error}); {INSTALL_HINT}"
    return None


def mamba_ssm_unavailable_reason(device: torch.device) -> str | None:
    """Why mamba_ssm's kernel cannot run on ``device``, or None when it can."""
    if device.type != "cuda":
        return f"mamba_ssm runs on CUDA tensors only, not on {device.type}"
    return _import_error()


def selective_scan_mamba_ssm(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Call ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    Same arguments and results as the reference; the gradient of the last state is not
    propagated (mamba_ssm's own limitation).
    """
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if u.dtype == torch.float64:
        raise TypeError("selective_scan: mamba_ssm takes float32, float16 or bfloat16; use backend='reference'")
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
