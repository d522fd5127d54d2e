"""Pure-PyTorch selective scan: the readable oracle every fast path is tested against.

It follows mamba_ssm's ``selective_scan_ref`` step by step, sequentially over the
sequence, and computes in float64 whatever the input dtype, so the fast backends can be
compared with it at tight tolerances. It is differentiable through autograd and slow.

Shapes (einops notation): ``b`` batch, ``d`` channels (dim), ``n`` state size,
``g`` groups of channels sharing B and C, ``l`` sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_mamba_seg.kernels._validation import check_scan_inputs


def selective_scan_reference(
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
    """Selective scan, one step per position, in float64.

    Computes ``dt = softplus(delta + delta_bias)`` (softplus only if ``delta_softplus``),
    ``h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t``, ``y_t = <C_t, h_t> + D * u_t``
    and ``out = y * silu(z)`` when ``z`` is given.

    Args:
        u: Input, ``(b, d, l)``.
        delta: Step sizes before bias and softplus, ``(b, d, l)``.
        A: State matrix (diagonal, one row per channel), ``(d, n)``.
        B: Input projection, ``(b, n, l)`` or grouped ``(b, g, n, l)`` with ``d % g == 0``.
        C: Output projection, same shape as ``B``.
        D: Skip connection, ``(d,)``.
        z: Gate, ``(b, d, l)``.
        delta_bias: Added to ``delta`` before softplus, ``(d,)``.
        delta_softplus: Whether to apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the final state ``h_L``.

    Returns:
        ``out`` ``(b, d, l)`` in ``u``'s dtype, and with ``return_last_state`` also the
        last state ``(b, d, n)`` in float32 (as mamba_ssm returns it; float64 inputs give
        float64).
    """
    dims = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length, state, groups = dims
    dtype_in = u.dtype
    f64 = torch.float64
    u, delta = u.to(f64), delta.to(f64)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f64)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    # Channels as (g, d/g): a group's channels share one row of B and C.
    A = A.to(f64).reshape(groups, dim // groups, state)
    B = B.to(f64).reshape(batch, groups, 1, state, length)
    C = C.to(f64).reshape(batch, groups, 1, state, length)
    # unbind (not indexing in the loop): its backward is a single stack.
    u_t, dt_t, B_t, C_t = (x.unbind(-1) for x in (u, delta, B, C))

    h = u.new_zeros(batch, groups, dim // groups, state)
    ys = []
    for t in range(length):
        dt = dt_t[t].reshape(batch, groups, dim // groups, 1)
        h = torch.exp(dt * A) * h + dt * u_t[t].reshape(dt.shape) * B_t[t]
        ys.append((h * C_t[t]).sum(-1).reshape(batch, dim))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D.to(f64)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f64))
    out = y.to(dtype_in)
    if not return_last_state:
        return out
    state_dtype = f64 if dtype_in == f64 else torch.float32
    return out, h.reshape(batch, dim, state).to(state_dtype)
