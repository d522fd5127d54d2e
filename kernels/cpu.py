"""The fast CPU selective scan: fused numba kernels behind a torch autograd Function.

Numba ships wheels for Linux, macOS and Windows, so a plain ``pip install`` gets this
path without a compiler; the kernels compile on first use (a few seconds, then cached
on disk). Computation is in float32 whatever the input dtype among float16, bfloat16
and float32; outputs and gradients come back in the inputs' dtypes. Results are
deterministic for a given number of threads.
"""

from __future__ import annotations

import threading

import torch

from napari_mamba_seg.kernels._validation import check_scan_inputs

# numba's default threading layer ("workqueue") aborts the process when two Python threads
# launch parallel kernels at once (a napari worker and a script, say): one launch at a time.
_KERNEL_LOCK = threading.Lock()


def cpu_unavailable_reason(device: torch.device) -> str | None:
    """Why the ``cpu`` backend cannot run on ``device``, or None when it can."""
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not on {device.type}; move the tensors with .cpu()"
    try:
        import numba  # noqa: F401
    except ImportError:
        return "the cpu backend needs numba: pip install numba"
    return None


def selective_scan_cpu(
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
    """Selective scan on CPU tensors with fused numba kernels (forward and backward).

    Same arguments, shapes and results as
    :func:`napari_mamba_seg.kernels.reference.selective_scan_reference`. Unlike
    mamba_ssm, the gradient of the last state is propagated too.

    Raises:
        TypeError: float64 inputs (this path computes in float32; use the reference).
        ValueError: Tensors not on the CPU, or shapes that do not match.
    """
    dims = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    reason = cpu_unavailable_reason(u.device)
    if reason is not None:
        raise ValueError(f"selective_scan: {reason}")
    for name, tensor in {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z}.items():
        if tensor is not None and tensor.dtype == torch.float64:
            raise TypeError(
                f"selective_scan: {name} is float64, but the cpu backend computes in float32; "
                "pass float32 tensors or use backend='reference' for float64"
            )
    out, last_state = _SelectiveScanCPU.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), dims.groups, B.dim() == 3
    )
    return (out, last_state) if return_last_state else out


def _f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).contiguous()


_SMALL_STATE = 4
"""Up to this many states, inference scans one lane per channel (see :func:`_state_width`)."""


def _state_width(state: int, training: bool) -> int:
    """States the kernels carry for ``state`` states: the state padded to ``LANES``, or as it is.

    The kernels scan one vector of ``LANES`` states per channel when the state is padded
    to exactly that (padding states have ``A = B = C = 0``, so they stay 0 and so do their
    gradients), and one lane per channel otherwise. Measured (single thread, SS2D shape),
    the state vector wins for the backward at every N up to ``LANES`` (N = 1: 55 against
    70 ms) and for the forward from N = 8 on; below that the forward alone is faster with
    one lane per channel (N = 1: 16 against 23 ms, N = 4: 19 against 24 ms). Inference up
    to N = 4 therefore keeps the state as it is.
    """
    from napari_mamba_seg.kernels import _cpu_kernels as kern

    if state > kern.LANES or (not training and state <= _SMALL_STATE):
        return state
    return kern.LANES


def _as_groups(BC: torch.Tensor, width: int) -> torch.Tensor:
    """``(b, n, l)`` or ``(b, g, n, l)`` to float32 ``(b, g, l, width)``, contiguous, zeros past ``n``.

    Transposed by a numba kernel (call it holding ``_KERNEL_LOCK``): torch's strided copy
    is slower, and its OpenMP threads would keep spinning on the cores the scan is about to use.
    """
    from napari_mamba_seg.kernels import _cpu_kernels as kern

    BC = _f32(BC[:, None] if BC.dim() == 3 else BC)
    out = BC.new_empty(*BC.shape[:2], BC.shape[3], width)
    kern.sequence_major(BC.numpy(), out.numpy())
    return out


def _pad_states(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros appended to the last (state) axis up to ``width``."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1])) if tensor.shape[-1] < width else tensor


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, groups, ungrouped):
        from napari_mamba_seg.kernels import _cpu_kernels as kern

        _use_torch_threads()
        batch, dim, length = u.shape
        state = A.shape[1]
        # The states the backward pass restarts from; not needed under no_grad (inference).
        save_states = any(ctx.needs_input_grad[:8])
        width = _state_width(state, training=save_states)
        u32, delta32, A32 = _f32(u), _f32(delta), _pad_states(_f32(A), width)
        D32 = _f32(D) if D is not None else u32.new_zeros(dim)
        bias32 = _f32(delta_bias) if delta_bias is not None else u32.new_zeros(dim)
        z32 = _f32(z) if z is not None else u32.new_zeros(1, 1, 1)
        out = u32.new_empty(batch, dim, length)
        n_tiles = -(-length // kern.TILE) if save_states else 0
        tile_states = u32.new_empty(batch, dim, n_tiles, width)
        last_state = u32.new_empty(batch, dim, width)
        with _KERNEL_LOCK:
            Bt, Ct = _as_groups(B, width), _as_groups(C, width)
            kern.scan_forward(
                u32.numpy(), delta32.numpy(), bias32.numpy(), A32.numpy(), Bt.numpy(), Ct.numpy(),
                D32.numpy(), z32.numpy(), softplus, z is not None,
                out.numpy(), tile_states.numpy(), last_state.numpy(), save_states,
            )  # fmt: skip
        ctx.save_for_backward(u32, delta32, bias32, A32, Bt, Ct, D32, z32, tile_states)
        ctx.setup = (softplus, z is not None, D is not None, delta_bias is not None, ungrouped)
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias))
        ctx.state = state
        return out.to(u.dtype), last_state[..., :state].contiguous()

    @staticmethod
    def backward(ctx, dout, dlast_state):
        from napari_mamba_seg.kernels import _cpu_kernels as kern

        _use_torch_threads()
        u32, delta32, bias32, A32, Bt, Ct, D32, z32, tile_states = ctx.saved_tensors
        softplus, has_z, has_D, has_bias, ungrouped = ctx.setup
        batch, dim, _length = u32.shape
        groups, length, width = Bt.shape[1], Bt.shape[2], Bt.shape[3]
        state = ctx.state
        dout32 = _f32(dout) if dout is not None else torch.zeros_like(u32)
        dlast32 = _pad_states(_f32(dlast_state), width) if dlast_state is not None else u32.new_zeros(batch, dim, width)
        n_parts = max(1, min(torch.get_num_threads(), kern.count_blocks(batch, dim, groups)))
        du, ddelta = torch.empty_like(u32), torch.empty_like(u32)
        dz = torch.empty_like(u32) if has_z else u32.new_zeros(1, 1, 1)
        dA_per_batch = u32.new_empty(batch, dim, width)
        dD_per_batch = u32.new_empty(batch, dim)
        dBt_parts = u32.new_zeros(n_parts, batch, groups, length, width)
        dCt_parts = u32.new_zeros(n_parts, batch, groups, length, width)
        with _KERNEL_LOCK:
            kern.scan_backward(
                u32.numpy(), delta32.numpy(), bias32.numpy(), A32.numpy(), Bt.numpy(), Ct.numpy(),
                D32.numpy(), z32.numpy(), softplus, has_z, dout32.numpy(), tile_states.numpy(), dlast32.numpy(),
                du.numpy(), ddelta.numpy(), dz.numpy(), dA_per_batch.numpy(), dD_per_batch.numpy(),
                dBt_parts.numpy(), dCt_parts.numpy(),
            )  # fmt: skip
        dB = dBt_parts.sum(0)[..., :state].transpose(-1, -2)
        dC = dCt_parts.sum(0)[..., :state].transpose(-1, -2)
        if ungrouped:
            dB, dC = dB[:, 0], dC[:, 0]
        dtypes = ctx.dtypes
        grads = [
            du.to(dtypes[0]),
            ddelta.to(dtypes[1]),
            dA_per_batch.sum(0)[:, :state].to(dtypes[2]),
            dB.to(dtypes[3]),
            dC.to(dtypes[4]),
            dD_per_batch.sum(0).to(dtypes[5]) if has_D else None,
            dz.to(dtypes[6]) if has_z else None,
            ddelta.sum((0, 2)).to(dtypes[7]) if has_bias else None,
        ]
        return (*grads, None, None, None)


def _use_torch_threads() -> None:
    """Run numba's kernels on as many threads as torch uses (``torch.set_num_threads``)."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
