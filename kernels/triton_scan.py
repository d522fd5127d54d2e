"""Triton selective scan: chunked forward and backward kernels for GPUs (and the Triton CPU interpreter).

Same semantics as :func:`napari_mamba_seg.kernels.reference.selective_scan_reference` (mamba_ssm's
``selective_scan_fn``): ``dt = softplus(delta + delta_bias)``, ``h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t``,
``y_t = <C_t, h_t> + D * u_t`` and ``out = y * silu(z)``.

Design:
    * One Triton program per ``(batch, channel)`` pair. It walks the sequence in chunks of ``BLOCK_L`` positions,
      so the sequence length is unbounded (3D volumes flattened to ``L = 262144`` and more).
    * Within a chunk it builds the decays ``a = exp(dt * A)`` and inputs ``b = dt * u * B`` as ``(N, BLOCK_L)``
      tiles and runs ``tl.associative_scan`` along ``L`` with the first-order recurrence combine
      ``(a1, b1), (a2, b2) -> (a1 * a2, a2 * b1 + b2)``; the state is carried across chunks as
      ``h = a_cum * h_prev + b_cum``. Only products of decays (all ``<= 1`` for ``A < 0``) are ever formed, never
      ``exp(+|A| * sum(dt))`` or a division by a decay, so trained models (``A`` down to ``-16``, ``dt`` up to 5)
      stay finite.
    * The forward saves the state at the start of every chunk, ``(b, d, n_chunks, N)`` float32, when a gradient
      is needed. The backward walks the chunks in reverse, recomputes each chunk's forward from its saved start
      state, runs the adjoint recurrence ``dh_t = C_t * g_t + a_{t+1} * dh_{t+1}`` with a reverse associative scan
      and carries ``dh`` across chunks.
    * State and every accumulation are float32 whatever the input dtype (float32, float16, bfloat16). ``dB`` and
      ``dC`` are shared by the ``d / g`` channels of a group and accumulated with ``tl.atomic_add`` into float32
      buffers; ``dA``, ``dD`` and ``d delta_bias`` are written as per-program partials and summed over the batch
      with torch.

The gradient of the returned last state is propagated too (mamba_ssm ignores it): it seeds the adjoint ``dh``.

Triton is optional: this module imports without it, and :func:`triton_unavailable_reason` says why the backend
cannot run. The kernels are wrapped for the GPU compiler or for the CPU interpreter when first launched, following
the tensors' device and ``TRITON_INTERPRET`` at that moment, so CPU tensors run interpreted whether triton was
imported before or after ``TRITON_INTERPRET=1`` was set. (Compiling for the GPU still needs a process that imported
triton without ``TRITON_INTERPRET=1``: triton itself cannot switch back.)
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any

import torch

from napari_mamba_seg.kernels._triton_import import import_triton_isolated
from napari_mamba_seg.kernels._validation import check_scan_inputs

import_triton_isolated()  # a plain import next to Mesa's OpenGL (napari) crashes; see that module
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["selective_scan_triton", "triton_unavailable_reason"]

# Largest chunk of the sequence one program scans at once (a power of two). Tests lower it to exercise chunk
# boundaries cheaply.
_MAX_BLOCK_L = 256
# Smallest chunk (short sequences are padded up to it).
_MIN_BLOCK_L = 16
# Chunks are also capped to (N, BLOCK_L) tiles of at most this many elements. Inference (no saved states) and
# training (forward saving chunk states + backward, which must agree on the chunk) have their own caps, tuned on an
# H100 at the SS2D benchmark shape (d 768, N 16, L 4096; sweep in BENCHMARKS.md): inference is fastest with
# (16, 128) tiles and 4 warps (146 us vs 228 us at (16, 64)); training with (16, 256) tiles and 4 warps in the
# backward (927 us forward+backward vs 1228 us at (16, 64) with 8 warps), despite register spills.
_MAX_TILE_INFERENCE = 2048
_MAX_TILE_TRAINING = 4096
_NUM_WARPS_FWD = 4
_NUM_WARPS_BWD = 4

_INSTALL_HINT = (
    "pip install triton (Linux x86_64); it needs an NVIDIA GPU, or TRITON_INTERPRET=1 for the CPU interpreter"
)


def _interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` (or another true value) is set in the environment."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")  # as triton parses it


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """Say why the Triton backend cannot run on ``device``, or return None when it can.

    The backend runs when triton is importable and either the device is CUDA (with a working CUDA runtime) or
    ``TRITON_INTERPRET=1`` is set and the device is the CPU (Triton's interpreter, slow, meant for tests).

    Args:
        device: The device the scan inputs live on.

    Returns:
        None when the backend can run there, else a one-sentence reason that says how to get it.
    """
    device = torch.device(device)
    if triton is None:
        return f"The Triton backend needs the triton package: {_INSTALL_HINT}."
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                "The Triton backend got CUDA tensors but torch finds no usable CUDA device; install a CUDA build of "
                "torch and an NVIDIA driver, or set TRITON_INTERPRET=1 and use CPU tensors."
            )
        return None
    if device.type == "cpu":
        if _interpret_requested():
            return None
        return (
            "The Triton backend runs on NVIDIA GPUs; move the inputs to a CUDA device, or set TRITON_INTERPRET=1 "
            "to run it on CPU tensors in Triton's (slow) interpreter."
        )
    return (
        f"The Triton backend does not support {device.type} tensors; use CUDA tensors on an NVIDIA GPU, or CPU "
        "tensors with TRITON_INTERPRET=1."
    )


# --------------------------------------------------------------------------------------------------------------
# Kernels. They are plain functions here and wrapped by ``_kernel`` (JIT for the GPU or interpreted) on first use.
# ``_combine`` must be a JITFunction for the GPU compiler; the interpreter calls its ``.fn`` directly.
# Interpreter quirk: a JITFunction cannot be called from interpreted code, and triton.language's own @jit helpers
# (tl.zeros, tl.sum, tl.sigmoid, tl.cdiv, ...) are JITFunctions whenever triton was imported before
# TRITON_INTERPRET=1 was set (e.g. by a test conftest). So the kernels use only builtins (tl.full, tl.reduce with
# ``_sum_combine``, bound per mode in ``_kernel``, tl.exp) and inline their helpers; they then run interpreted
# whatever the import order.
# --------------------------------------------------------------------------------------------------------------


def _combine_fn(a1, b1, a2, b2):
    """Compose two steps of ``h -> a * h + b``: first ``(a1, b1)``, then ``(a2, b2)``."""
    return a1 * a2, a2 * b1 + b2


def _selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    states_ptr,
    last_ptr,
    dim,
    length,
    state,
    n_chunks,
    ch_per_group,
    stride_u_b,
    stride_u_d,
    stride_u_l,
    stride_dt_b,
    stride_dt_d,
    stride_dt_l,
    stride_A_d,
    stride_A_n,
    stride_B_b,
    stride_B_g,
    stride_B_n,
    stride_B_l,
    stride_C_b,
    stride_C_g,
    stride_C_n,
    stride_C_l,
    stride_z_b,
    stride_z_d,
    stride_z_l,
    stride_o_b,
    stride_o_d,
    stride_o_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Forward scan of one (batch, channel) row: writes ``out``, the chunk start states and the last state."""
    pid = tl.program_id(0)
    pid_b = (pid // dim).to(tl.int64)
    pid_d = (pid % dim).to(tl.int64)
    pid_g = pid_d // ch_per_group
    row = pid_b * dim + pid_d

    u_base = u_ptr + pid_b * stride_u_b + pid_d * stride_u_d
    dt_base = delta_ptr + pid_b * stride_dt_b + pid_d * stride_dt_d
    B_base = B_ptr + pid_b * stride_B_b + pid_g * stride_B_g
    C_base = C_ptr + pid_b * stride_C_b + pid_g * stride_C_g
    z_base = z_ptr + pid_b * stride_z_b + pid_d * stride_z_d
    o_base = out_ptr + pid_b * stride_o_b + pid_d * stride_o_d

    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < state
    offs_t = tl.arange(0, BLOCK_L)
    A_row = tl.load(A_ptr + pid_d * stride_A_d + offs_n * stride_A_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_D:
        D_val = tl.load(D_ptr + pid_d).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + pid_d).to(tl.float32)

    h = tl.full([BLOCK_N], 0.0, tl.float32)
    for ci in range(n_chunks):
        if SAVE_STATES:
            tl.store(states_ptr + (row * n_chunks + ci) * state + offs_n, h, mask=mask_n)
        offs_l = ci * BLOCK_L + offs_t
        mask_l = offs_l < length
        mask_nl = mask_n[:, None] & mask_l[None, :]

        u = tl.load(u_base + offs_l * stride_u_l, mask=mask_l, other=0.0).to(tl.float32)
        x = tl.load(dt_base + offs_l * stride_dt_l, mask=mask_l, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + bias
        if SOFTPLUS:
            # softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p by Goldberg's trick (accurate for tiny e).
            e = tl.exp(-tl.abs(x))
            w = 1.0 + e
            dt = tl.maximum(x, 0.0) + tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
        else:
            dt = x
        dt = tl.where(mask_l, dt, 0.0)  # padded positions: a = 1, b = 0 (identity step)

        B_t = tl.load(B_base + offs_n[:, None] * stride_B_n + offs_l[None, :] * stride_B_l, mask=mask_nl, other=0.0)
        a = tl.exp(dt[None, :] * A_row[:, None])
        b = B_t.to(tl.float32) * (dt * u)[None, :]
        a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=_combine)
        hs = a_cum * h[:, None] + b_cum  # (BLOCK_N, BLOCK_L): h_t for every t of the chunk

        C_t = tl.load(C_base + offs_n[:, None] * stride_C_n + offs_l[None, :] * stride_C_l, mask=mask_nl, other=0.0)
        y = tl.reduce(hs * C_t.to(tl.float32), 0, _sum_combine)
        if HAS_D:
            y = y + D_val * u
        if HAS_Z:
            zv = tl.load(z_base + offs_l * stride_z_l, mask=mask_l, other=0.0).to(tl.float32)
            y = y * (zv / (1.0 + tl.exp(-zv)))
        tl.store(o_base + offs_l * stride_o_l, y.to(out_ptr.dtype.element_ty), mask=mask_l)
        # state after the chunk = last column (padded columns are identity steps)
        h = tl.reduce(tl.where(offs_t[None, :] == BLOCK_L - 1, hs, 0.0), 1, _sum_combine)
    tl.store(last_ptr + row * state + offs_n, h, mask=mask_n)


def _selective_scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dout_ptr,
    states_ptr,
    dlast_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dA_part_ptr,
    dB_ptr,
    dC_ptr,
    dD_part_ptr,
    dbias_part_ptr,
    dim,
    length,
    state,
    n_chunks,
    ch_per_group,
    groups,
    stride_u_b,
    stride_u_d,
    stride_u_l,
    stride_dt_b,
    stride_dt_d,
    stride_dt_l,
    stride_A_d,
    stride_A_n,
    stride_B_b,
    stride_B_g,
    stride_B_n,
    stride_B_l,
    stride_C_b,
    stride_C_g,
    stride_C_n,
    stride_C_l,
    stride_z_b,
    stride_z_d,
    stride_z_l,
    stride_g_b,
    stride_g_d,
    stride_g_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Backward of one (batch, channel) row, chunks in reverse, each recomputed from its saved start state."""
    pid = tl.program_id(0)
    pid_b = (pid // dim).to(tl.int64)
    pid_d = (pid % dim).to(tl.int64)
    pid_g = pid_d // ch_per_group
    row = pid_b * dim + pid_d

    u_base = u_ptr + pid_b * stride_u_b + pid_d * stride_u_d
    dt_base = delta_ptr + pid_b * stride_dt_b + pid_d * stride_dt_d
    B_base = B_ptr + pid_b * stride_B_b + pid_g * stride_B_g
    C_base = C_ptr + pid_b * stride_C_b + pid_g * stride_C_g
    z_base = z_ptr + pid_b * stride_z_b + pid_d * stride_z_d
    g_base = dout_ptr + pid_b * stride_g_b + pid_d * stride_g_d
    # gradient buffers are contiguous: du/ddelta/dz (b, d, L); dB/dC (b, g, N, L) float32
    row_l = row * length
    dBC_base = (pid_b * groups + pid_g) * state * length

    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < state
    offs_t = tl.arange(0, BLOCK_L)
    A_row = tl.load(A_ptr + pid_d * stride_A_d + offs_n * stride_A_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_D:
        D_val = tl.load(D_ptr + pid_d).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + pid_d).to(tl.float32)

    if HAS_DLAST:
        dh_carry = tl.load(dlast_ptr + row * state + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        dh_carry = tl.full([BLOCK_N], 0.0, tl.float32)
    dA_acc = tl.full([BLOCK_N], 0.0, tl.float32)
    dD_acc = tl.full([BLOCK_L], 0.0, tl.float32)
    dbias_acc = tl.full([BLOCK_L], 0.0, tl.float32)

    for i in range(n_chunks):
        ci = n_chunks - 1 - i
        offs_l = ci * BLOCK_L + offs_t
        mask_l = offs_l < length
        mask_nl = mask_n[:, None] & mask_l[None, :]

        # ---- recompute the chunk's forward from its start state
        h0 = tl.load(states_ptr + (row * n_chunks + ci) * state + offs_n, mask=mask_n, other=0.0)
        u = tl.load(u_base + offs_l * stride_u_l, mask=mask_l, other=0.0).to(tl.float32)
        x = tl.load(dt_base + offs_l * stride_dt_l, mask=mask_l, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = x + bias
        if SOFTPLUS:
            e = tl.exp(-tl.abs(x))
            w = 1.0 + e
            dt = tl.maximum(x, 0.0) + tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
        else:
            dt = x
        dt = tl.where(mask_l, dt, 0.0)
        B_t = tl.load(B_base + offs_n[:, None] * stride_B_n + offs_l[None, :] * stride_B_l, mask=mask_nl, other=0.0).to(
            tl.float32
        )
        C_t = tl.load(C_base + offs_n[:, None] * stride_C_n + offs_l[None, :] * stride_C_l, mask=mask_nl, other=0.0).to(
            tl.float32
        )
        a = tl.exp(dt[None, :] * A_row[:, None])
        b = B_t * (dt * u)[None, :]
        a_cum, b_cum = tl.associative_scan((a, b), axis=1, combine_fn=_combine)
        hs = a_cum * h0[:, None] + b_cum

        # ---- output gradient through D and the silu(z) gate
        g = tl.load(g_base + offs_l * stride_g_l, mask=mask_l, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.reduce(hs * C_t, 0, _sum_combine)
            if HAS_D:
                y = y + D_val * u
            zv = tl.load(z_base + offs_l * stride_z_l, mask=mask_l, other=0.0).to(tl.float32)
            sz = 1.0 / (1.0 + tl.exp(-zv))
            dz = g * y * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + row_l + offs_l, dz.to(dz_ptr.dtype.element_ty), mask=mask_l)
            dy = g * zv * sz
        else:
            dy = g

        # ---- adjoint recurrence dh_t = C_t * dy_t + a_{t+1} * dh_{t+1}, reverse scan; a_{t+1} = 1 past L
        offs_l1 = offs_l + 1
        mask_l1 = offs_l1 < length
        x1 = tl.load(dt_base + offs_l1 * stride_dt_l, mask=mask_l1, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x1 = x1 + bias
        if SOFTPLUS:
            e1 = tl.exp(-tl.abs(x1))
            w1 = 1.0 + e1
            dt1 = tl.maximum(x1, 0.0) + tl.where(w1 == 1.0, e1, tl.log(w1) * (e1 / tl.where(w1 == 1.0, 1.0, w1 - 1.0)))
        else:
            dt1 = x1
        dt1 = tl.where(mask_l1, dt1, 0.0)
        a_next = tl.exp(dt1[None, :] * A_row[:, None])
        ra, rb = tl.associative_scan((a_next, C_t * dy[None, :]), axis=1, combine_fn=_combine, reverse=True)
        dh = ra * dh_carry[:, None] + rb
        dh_carry = tl.reduce(tl.where(offs_t[None, :] == 0, dh, 0.0), 1, _sum_combine)

        # ---- parameter gradients; a_t * h_{t-1} = h_t - b_t avoids shifting tiles
        hb = hs - b
        ddt = tl.reduce(dh * (A_row[:, None] * hb + u[None, :] * B_t), 0, _sum_combine)
        dA_acc += tl.reduce(dh * hb * dt[None, :], 1, _sum_combine)
        du = tl.reduce(dh * B_t, 0, _sum_combine) * dt
        if HAS_D:
            du = du + D_val * dy
            dD_acc += dy * u
        tl.store(du_ptr + row_l + offs_l, du.to(du_ptr.dtype.element_ty), mask=mask_l)
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-x))
        ddt = tl.where(mask_l, ddt, 0.0)
        tl.store(ddelta_ptr + row_l + offs_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_l)
        if HAS_BIAS:
            dbias_acc += ddt
        bc_offs = dBC_base + offs_n[:, None] * length + offs_l[None, :]
        tl.atomic_add(dB_ptr + bc_offs, dh * (dt * u)[None, :], mask=mask_nl, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_offs, hs * dy[None, :], mask=mask_nl, sem="relaxed")

    tl.store(dA_part_ptr + row * state + offs_n, dA_acc, mask=mask_n)
    if HAS_D:
        tl.store(dD_part_ptr + row, tl.reduce(dD_acc, 0, _sum_combine))
    if HAS_BIAS:
        tl.store(dbias_part_ptr + row, tl.reduce(dbias_acc, 0, _sum_combine))


def _add_fn(a, b):
    """Sum combine for ``tl.reduce`` (what ``tl.sum`` reduces float32 with)."""
    return a + b


_combine = triton.JITFunction(_combine_fn) if triton is not None else None
_add = triton.JITFunction(_add_fn) if triton is not None else None
_sum_combine = _add  # module-level default; ``_kernel`` rebinds it per mode in each kernel's own globals

_KERNEL_SOURCES = {"fwd": _selective_scan_fwd_kernel, "bwd": _selective_scan_bwd_kernel}
_KERNEL_CACHE: dict[tuple[str, bool], Any] = {}


def _kernel(name: str, device: torch.device) -> Any:
    """The launchable kernel ``name``: interpreted for CPU tensors or under TRITON_INTERPRET=1, else GPU JIT.

    Each mode gets its own copy of the kernel function whose globals bind ``_sum_combine``: a JITFunction of our
    own for the GPU compiler, and ``tl.standard._sum_combine`` for the interpreter, which recognises that object
    and reduces with numpy instead of calling a combine per element (it may be an interpreted function, unusable
    by the GPU compiler, when triton was imported under TRITON_INTERPRET=1).
    """
    interpret = device.type != "cuda" or _interpret_requested()
    key = (name, interpret)
    if key not in _KERNEL_CACHE:
        src = _KERNEL_SOURCES[name]
        scope = dict(src.__globals__)
        scope["_sum_combine"] = getattr(tl.standard, "_sum_combine", _add) if interpret else _add
        fn = types.FunctionType(src.__code__, scope, src.__name__, src.__defaults__, src.__closure__)
        functools.update_wrapper(fn, src, updated=())
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNEL_CACHE[key] = InterpretedFunction(fn)
        else:
            _KERNEL_CACHE[key] = triton.JITFunction(fn)
    return _KERNEL_CACHE[key]


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------


def _block_sizes(length: int, state: int, training: bool) -> tuple[int, int]:
    """``(BLOCK_L, BLOCK_N)``. With ``training`` (states saved for the backward) forward and backward must agree:
    the saved states are per BLOCK_L chunk."""
    block_n = triton.next_power_of_2(state)
    max_tile = _MAX_TILE_TRAINING if training else _MAX_TILE_INFERENCE
    cap = max(_MIN_BLOCK_L, min(_MAX_BLOCK_L, max_tile // block_n))
    block_l = min(cap, max(_MIN_BLOCK_L, triton.next_power_of_2(max(length, 1))))
    return block_l, block_n


def _as_grouped(BC: torch.Tensor) -> torch.Tensor:
    """``(b, n, l) -> (b, 1, n, l)`` view; grouped ``(b, g, n, l)`` unchanged."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def _forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    save_states: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel.

    Returns:
        ``out`` ``(b, d, l)`` in ``u``'s dtype, the last state ``(b, d, n)`` float32 and, if ``save_states``, the
        chunk start states ``(b, d, n_chunks, n)`` float32 (else None).
    """
    batch, dim, length = u.shape
    state = A.shape[1]
    B4, C4 = _as_grouped(B), _as_grouped(C)
    groups = B4.shape[1]
    block_l, block_n = _block_sizes(length, state, training=save_states)
    n_chunks = triton.cdiv(length, block_l)

    out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last = torch.empty((batch, dim, state), dtype=torch.float32, device=u.device)
    states = torch.empty((batch, dim, n_chunks, state), dtype=torch.float32, device=u.device) if save_states else last
    D_arg = D.contiguous() if D is not None else A
    bias_arg = delta_bias.contiguous() if delta_bias is not None else A
    z_arg = z if z is not None else u
    _kernel("fwd", u.device)[(batch * dim,)](
        u,
        delta,
        A,
        B4,
        C4,
        D_arg,
        z_arg,
        bias_arg,
        out,
        states,
        last,
        dim,
        length,
        state,
        n_chunks,
        dim // groups,
        *u.stride(),
        *delta.stride(),
        *A.stride(),
        *B4.stride(),
        *C4.stride(),
        *z_arg.stride(),
        *out.stride(),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        SAVE_STATES=save_states,
        BLOCK_L=block_l,
        BLOCK_N=block_n,
        num_warps=_NUM_WARPS_FWD,
    )
    return out, last, (states if save_states else None)


def _backward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    states: torch.Tensor,
    dout: torch.Tensor,
    dlast: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """Launch the backward kernel; gradients for ``(u, delta, A, B, C, D, z, delta_bias)`` in their dtypes."""
    batch, dim, length = u.shape
    state = A.shape[1]
    B4, C4 = _as_grouped(B), _as_grouped(C)
    groups = B4.shape[1]
    block_l, block_n = _block_sizes(length, state, training=True)
    n_chunks = triton.cdiv(length, block_l)
    dev = u.device

    du = torch.empty((batch, dim, length), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, length), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, length), dtype=z.dtype, device=dev) if z is not None else None
    dA_part = torch.empty((batch, dim, state), dtype=torch.float32, device=dev)
    dB = torch.zeros((batch, groups, state, length), dtype=torch.float32, device=dev)
    dC = torch.zeros((batch, groups, state, length), dtype=torch.float32, device=dev)
    dD_part = torch.empty((batch, dim), dtype=torch.float32, device=dev) if D is not None else None
    dbias_part = torch.empty((batch, dim), dtype=torch.float32, device=dev) if delta_bias is not None else None

    D_arg = D.contiguous() if D is not None else A
    bias_arg = delta_bias.contiguous() if delta_bias is not None else A
    z_arg = z if z is not None else u
    dlast_arg = dlast.contiguous().float() if dlast is not None else states
    _kernel("bwd", dev)[(batch * dim,)](
        u,
        delta,
        A,
        B4,
        C4,
        D_arg,
        z_arg,
        bias_arg,
        dout,
        states,
        dlast_arg,
        du,
        ddelta,
        dz if dz is not None else du,
        dA_part,
        dB,
        dC,
        dD_part if dD_part is not None else dA_part,
        dbias_part if dbias_part is not None else dA_part,
        dim,
        length,
        state,
        n_chunks,
        dim // groups,
        groups,
        *u.stride(),
        *delta.stride(),
        *A.stride(),
        *B4.stride(),
        *C4.stride(),
        *z_arg.stride(),
        *dout.stride(),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        HAS_DLAST=dlast is not None,
        BLOCK_L=block_l,
        BLOCK_N=block_n,
        num_warps=_NUM_WARPS_BWD,
    )
    dA = dA_part.sum(0).to(A.dtype)
    dB = dB.to(B.dtype).reshape(B.shape)
    dC = dC.to(C.dtype).reshape(C.shape)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class _SelectiveScanTritonFn(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward (gradients of all eight tensor inputs)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_enabled):
        # ctx.needs_input_grad ignores torch.no_grad(); the caller passes whether grad mode was on.
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:8])
        empty = u.numel() == 0 or A.numel() == 0
        if empty:
            batch, dim, length = u.shape
            out = torch.zeros((batch, dim, length), dtype=u.dtype, device=u.device)
            last = torch.zeros((batch, dim, A.shape[1]), dtype=torch.float32, device=u.device)
            states = None
        else:
            out, last, states = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, needs_grad)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.empty = empty
        ctx.set_materialize_grads(False)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        if ctx.empty or (dout is None and dlast is None):
            grads = [torch.zeros_like(t) if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
            return (*grads, None, None)
        if dout is None:
            dout = torch.zeros_like(u)
        grads = _backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states, dout, dlast)
        return (*grads, None, None)


def selective_scan_triton(
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
    """Selective scan with Triton forward and backward kernels (mamba_ssm's ``selective_scan_fn``).

    Computes ``dt = softplus(delta + delta_bias)`` (softplus only if ``delta_softplus``),
    ``h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t``, ``y_t = <C_t, h_t> + D * u_t`` and
    ``out = y * silu(z)`` when ``z`` is given. Differentiable w.r.t. ``u, delta, A, B, C, D, z, delta_bias``.
    Unlike mamba_ssm, the gradient of the returned last state is propagated too (a loss on ``h_L`` works).

    Args:
        u: Input, ``(b, d, l)``, float32, float16 or bfloat16.
        delta: Step sizes before bias and softplus, ``(b, d, l)``.
        A: State matrix (diagonal, one row per channel), ``(d, n)``.
        B: Input projection, ``(b, n, l)`` or grouped ``(b, g, n, l)`` with ``d % g == 0``; channel ``c`` uses
            group ``c // (d // g)``.
        C: Output projection, same shape as ``B``.
        D: Skip connection, ``(d,)``.
        z: Gate, ``(b, d, l)``.
        delta_bias: Added to ``delta`` before softplus, ``(d,)``.
        delta_softplus: Whether to apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the final state ``h_L``.

    Returns:
        ``out`` ``(b, d, l)`` in ``u``'s dtype, and with ``return_last_state`` also the last state ``(b, d, n)``
        in float32. The state and all accumulations are float32 whatever the input dtype; gradients come back in
        each input's dtype.

    Raises:
        TypeError: An input is float64 (use backend='reference' or 'cpu'), or fails the shared argument checks.
        ValueError: Shapes or devices do not match (see ``check_scan_inputs``).
        RuntimeError: Triton cannot run on the inputs' device (see :func:`triton_unavailable_reason`).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, tensor in named.items():
        if tensor is not None and tensor.dtype == torch.float64:
            raise TypeError(
                f"selective_scan_triton: {name} is float64, which the Triton backend does not support "
                "(it computes in float32); use backend='reference' or 'cpu' for float64"
            )
    reason = triton_unavailable_reason(u.device)
    if reason is not None:
        raise RuntimeError(reason)
    out, last = _SelectiveScanTritonFn.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), torch.is_grad_enabled()
    )
    return (out, last) if return_last_state else out
