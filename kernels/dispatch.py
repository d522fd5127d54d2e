"""One entry point for the selective scan, and the choice of backend behind it."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from napari_mamba_seg.kernels._validation import check_scan_inputs

BACKENDS = ("reference", "cpu", "triton", "mamba_ssm")
"""Every backend name ``selective_scan`` accepts besides ``"auto"``."""

BACKEND_ENV_VAR = "NAPARI_MAMBA_SEG_SCAN_BACKEND"
"""Environment variable naming the backend that ``backend="auto"`` uses."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def selective_scan(
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with the semantics of mamba_ssm's ``selective_scan_fn``.

    ``dt = softplus(delta + delta_bias)`` (softplus only if ``delta_softplus``),
    ``h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t``, ``y_t = <C_t, h_t> + D * u_t``,
    ``out = y * silu(z)`` when ``z`` is given. Differentiable with respect to every
    tensor argument on every backend.

    Args:
        u: Input, ``(batch, dim, L)``.
        delta: Step sizes before bias and softplus, ``(batch, dim, L)``.
        A: Diagonal state matrix, ``(dim, N)``.
        B: ``(batch, N, L)``, or ``(batch, groups, N, L)`` with ``dim % groups == 0``.
        C: Same shape as ``B``.
        D: Skip connection, ``(dim,)``.
        z: Gate, ``(batch, dim, L)``.
        delta_bias: ``(dim,)``.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the state after the last position.
        backend: ``"auto"`` (the fastest available for the tensors' device and dtype;
            the environment variable ``NAPARI_MAMBA_SEG_SCAN_BACKEND`` overrides it), or
            one of ``"reference"``, ``"cpu"``, ``"triton"``, ``"mamba_ssm"``.

    Returns:
        ``out`` ``(batch, dim, L)`` in ``u``'s dtype; with ``return_last_state`` also
        the last state ``(batch, dim, N)`` in float32.

    Raises:
        ValueError: Bad shapes, mixed devices, an unknown backend, or a backend that
            cannot run here (the message says how to get it).
        TypeError: Non-tensor arguments or unsupported dtypes.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device, u.dtype)
    scan = _backend_function(name)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "cpu" and u.device.type != "cpu":
        return _run_on_host(scan, args, u.device)
    return scan(*args)


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """Turn ``backend`` (or ``"auto"``) into the name of a backend that can run.

    Args:
        backend: ``"auto"`` or a name from :data:`BACKENDS`.
        device: Device of the tensors.
        dtype: Dtype of ``u``.

    Returns:
        A name from :data:`BACKENDS`.

    Raises:
        ValueError: Unknown name, or a backend that is unavailable on ``device``.
    """
    device = torch.device(device)
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV_VAR, "").strip()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(
                    f"{BACKEND_ENV_VAR}={override!r} is not a selective-scan backend; "
                    f"use one of {', '.join(('auto', *BACKENDS))} or unset it"
                )
            backend = override
        else:
            return _fastest_backend(device, dtype)
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose from {', '.join(('auto', *BACKENDS))}")
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"selective-scan backend {backend!r} is unavailable: {reason}")
    return backend


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Which backends can run, each with None or the reason it cannot.

    Args:
        device: Check every backend on this device. None checks each backend on the
            device it is made for: ``reference`` and ``cpu`` on the CPU, ``triton`` and
            ``mamba_ssm`` on CUDA.

    Returns:
        ``{name: None | reason}`` for every name in :data:`BACKENDS`.
    """
    natural = {"reference": "cpu", "cpu": "cpu", "triton": "cuda", "mamba_ssm": "cuda"}
    return {
        name: backend_unavailable_reason(name, torch.device(device if device is not None else natural[name]))
        for name in BACKENDS
    }


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        from napari_mamba_seg.kernels.cpu import cpu_unavailable_reason

        # Other devices than CUDA (e.g. Apple MPS) run the cpu backend through host memory.
        return cpu_unavailable_reason(torch.device("cpu") if device.type not in ("cpu", "cuda") else device)
    if backend == "triton":
        from napari_mamba_seg.kernels.triton_scan import triton_unavailable_reason

        return triton_unavailable_reason(device)
    if backend == "mamba_ssm":
        from napari_mamba_seg.kernels.mamba_ssm_backend import mamba_ssm_unavailable_reason

        return mamba_ssm_unavailable_reason(device)
    raise ValueError(f"unknown selective-scan backend {backend!r}; choose from {', '.join(BACKENDS)}")


def _fastest_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend for ``device`` and ``dtype``: CUDA kernels, then the CPU one."""
    if dtype == torch.float64:
        return "reference"
    if device.type == "cuda":
        for name in ("mamba_ssm", "triton"):
            if backend_unavailable_reason(name, device) is None:
                return name
        return "reference"
    if backend_unavailable_reason("cpu", device) is None:
        return "cpu"
    return "reference"


def _backend_function(name: str) -> Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    if name == "reference":
        from napari_mamba_seg.kernels.reference import selective_scan_reference

        return selective_scan_reference
    if name == "cpu":
        from napari_mamba_seg.kernels.cpu import selective_scan_cpu

        return selective_scan_cpu
    if name == "triton":
        from napari_mamba_seg.kernels.triton_scan import selective_scan_triton

        return selective_scan_triton
    from napari_mamba_seg.kernels.mamba_ssm_backend import selective_scan_mamba_ssm

    return selective_scan_mamba_ssm


def _run_on_host(scan: Callable, args: tuple, device: torch.device):
    """Run a CPU backend on tensors of another device (e.g. MPS) through host memory."""
    host = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    result = scan(*host)
    if isinstance(result, tuple):
        return tuple(r.to(device) for r in result)
    return result.to(device)
