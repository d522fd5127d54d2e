"""Numba kernels of the fast CPU selective scan (forward and backward).

Layout of the work: the channels of one group (they share B and C) are cut into blocks
of ``LANES`` channels, and a block is scanned together, one SIMD lane per channel, so
the inner loops run over a fixed-size lane axis that LLVM turns into vector
instructions with no horizontal reductions. The sequence is cut into tiles of ``TILE``
positions; a tile of u and delta is first transposed into small lane-major buffers that
stay in cache. The state is stored at the start of every tile during the forward pass,
so the backward pass recomputes one tile at a time instead of keeping the whole
``(b, d, L, N)`` history.

``exp`` is not vectorised by LLVM without a vector math library, so the kernels use
their own: ``2**x = 2**f * 2**k`` with ``k = round(x)``, a degree-6 polynomial for
``2**f`` on ``[-0.5, 0.5]`` (relative error below 2e-7) and ``2**k`` built from the
float bits. Every decay is ``exp(dt * A)`` of one step, never a product over many steps
or its inverse, so nothing overflows for trained models (A down to -16, dt up to 5).

Every kernel takes float32, C-contiguous arrays; the torch wrapper in ``cpu.py``
prepares them.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LANES = 16
"""Channels scanned together: two AVX2 vectors of float32. LLVM does not vectorise loops
of fewer than 16 iterations that need run-time alias checks, so 8 would stay scalar."""

TILE = 64
"""Sequence positions per tile; the forward pass stores the state every TILE steps."""

LOG2E = np.float32(1.4426950408889634)

# Coefficients of 2**f on [-0.5, 0.5], highest degree first: numpy.polyfit of degree 6
# on 64 Chebyshev nodes in float64; maximum relative error 2.6e-9 before float32
# rounding. tests/kernels/test_cpu_scan.py checks the float32 result against exp2.
_P6 = np.float32(0.00015469732009913898)
_P5 = np.float32(0.001340043216540128)
_P4 = np.float32(0.009618025602802787)
_P3 = np.float32(0.05550327214209563)
_P2 = np.float32(0.24022651213596855)
_P1 = np.float32(0.6931472067106196)
_P0 = np.float32(0.9999999999595479)

# Fast-math without reassociation: contraction into FMA and the like are welcome, but
# reordering ``x - round(x)`` would lose precision in fast_exp2.
_FASTMATH = {"nsz", "arcp", "contract", "afn"}
# error_model="numpy": float division without the ZeroDivisionError check, whose branch
# keeps LLVM from vectorising the loops that divide (softplus, sigmoid).
_JIT = {"fastmath": _FASTMATH, "error_model": "numpy", "cache": True, "nogil": True}


@intrinsic
def _pow2_from_biased(typingctx, biased):
    """``2**(biased - 126)`` as float32 from an int32 ``biased`` in [1, 253], vectorisable.

    Builds the float's bits, ``(biased + 1) << 23``, in 32-bit integer instructions
    (numba would widen the arithmetic to int64, which AVX2 cannot vectorise well).
    """
    if biased != types.int32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 1)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.int32), codegen


@numba.njit(inline="always", **_JIT)
def fast_exp2(x):
    """``2**x`` in float32 for ``x`` in ``[-125, 127]`` (clamped outside), vectorisable."""
    x = min(max(x, np.float32(-125.0)), np.float32(127.0))
    # round(x) + 126 by a truncating conversion of a positive number (no libm call);
    # f = x - round(x) in [-0.5, 0.5].
    biased = np.int32(x + np.float32(126.5))
    f = x - (np.float32(biased) - np.float32(126.0))
    p = _P6 * f + _P5
    p = p * f + _P4
    p = p * f + _P3
    p = p * f + _P2
    p = p * f + _P1
    p = p * f + _P0
    return p * _pow2_from_biased(biased)


@numba.njit(inline="always", **_JIT)
def fast_exp(x):
    """``e**x`` in float32 through :func:`fast_exp2`."""
    return fast_exp2(x * LOG2E)


@numba.njit(inline="always", **_JIT)
def _sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + fast_exp(-x))


@numba.njit(inline="always", **_JIT)
def _softplus(x):
    """``log(1 + e**x)`` as ``max(x, 0) + log1p(e**-|x|)``, the log by an atanh series.

    With ``e = e**-|x|`` in (0, 1], ``log(1 + e) = 2 atanh(s)``, ``s = e / (2 + e)`` in
    [0, 1/3]; six odd terms keep the relative error below 1e-7.
    """
    e = fast_exp(-abs(x))
    s = e / (np.float32(2.0) + e)
    s2 = s * s
    series = np.float32(1.0 / 11.0) * s2 + np.float32(1.0 / 9.0)
    series = series * s2 + np.float32(1.0 / 7.0)
    series = series * s2 + np.float32(1.0 / 5.0)
    series = series * s2 + np.float32(1.0 / 3.0)
    series = series * s2 + np.float32(1.0)
    return max(x, np.float32(0.0)) + np.float32(2.0) * s * series


@numba.njit(**_JIT)
def _block_channels(block, dim, groups):
    """Map a block index to ``(batch, group, first channel, channels in block)``."""
    per_group = dim // groups
    blocks_per_group = (per_group + LANES - 1) // LANES
    b = block // (groups * blocks_per_group)
    rest = block % (groups * blocks_per_group)
    g = rest // blocks_per_group
    first = g * per_group + (rest % blocks_per_group) * LANES
    width = min(LANES, (g + 1) * per_group - first)
    return b, g, first, width


@numba.njit(**_JIT)
def count_blocks(batch, dim, groups):
    """Number of channel blocks the kernels iterate over."""
    per_group = dim // groups
    return batch * groups * ((per_group + LANES - 1) // LANES)


@numba.njit(**_JIT)
def _load_tile(u, delta, delta_bias, softplus, b, first, width, t0, steps, dt_tile, u_tile, row):
    """Fill lane-major tiles ``dt_tile[t, w]`` and ``u_tile[t, w]``; idle lanes get zeros.

    The step sizes of one channel are computed in the contiguous scratch ``row`` first
    (a loop LLVM vectorises), then scattered into the lane-major tile.
    """
    for w in range(LANES):
        if w < width:
            c = first + w
            bias = delta_bias[c]
            if softplus:
                for t in range(steps):
                    row[t] = _softplus(delta[b, c, t0 + t] + bias)
            else:
                for t in range(steps):
                    row[t] = delta[b, c, t0 + t] + bias
            for t in range(steps):
                dt_tile[t, w] = row[t]
                u_tile[t, w] = u[b, c, t0 + t]
        else:
            for t in range(steps):
                dt_tile[t, w] = 0.0
                u_tile[t, w] = 0.0


@numba.njit(**_JIT)
def _load_block_rows(A, first, width, state, scale):
    """``A * scale`` of the block's channels as ``(N, LANES)``; idle lanes get zeros."""
    rows = np.zeros((state, LANES), dtype=np.float32)
    for w in range(width):
        for n in range(state):
            rows[n, w] = A[first + w, n] * scale
    return rows


# The backward's tile passes take the lane count as a run-time argument: with the constant
# LANES, LLVM fully unrolls these small loop bodies before its loop vectoriser runs (and
# numba leaves the SLP vectoriser off), so they would run scalar, about 3x slower.


@numba.njit(**_JIT)
def _reverse_adjoint(steps, state, C_rows, grad_tile, dh, decays, dh_rows, lanes):
    """Adjoint recurrence over a tile, last step first: ``dh_t = g_t C_t + a_{t+1} dh_{t+1}``.

    ``dh`` holds ``a_{t+1} dh_{t+1}`` on entry (``(N, LANES)``) and ``a_{t0} dh_{t0}`` on
    exit; ``dh_rows[t]`` receives ``dh_t``.
    """
    for t in range(steps - 1, -1, -1):
        for n in range(state):
            cv = C_rows[t, n]
            for w in range(lanes):
                dh_t = dh[n, w] + grad_tile[t, w] * cv
                dh_rows[t, n, w] = dh_t
                dh[n, w] = dh_t * decays[t, n, w]


@numba.njit(**_JIT)
def _log_decay_grads(steps, state, dh_rows, rows, decays, lanes):
    """Overwrite ``decays[t]`` with ``d loss / d (dt_t A) = dh_t * h_{t-1} * a_t``."""
    for t in range(steps):
        for n in range(state):
            for w in range(lanes):
                decays[t, n, w] = dh_rows[t, n, w] * rows[t, n, w] * decays[t, n, w]


@numba.njit(**_JIT)
def _state_sums_by_lane(steps, state, values, lane_rows, out, lanes):
    """``out[t, w] = sum_n values[t, n, w] * lane_rows[n, w]`` (A of the block's channels)."""
    for t in range(steps):
        for w in range(lanes):
            out[t, w] = 0.0
        for n in range(state):
            for w in range(lanes):
                out[t, w] += values[t, n, w] * lane_rows[n, w]


@numba.njit(**_JIT)
def _state_sums_by_row(steps, state, values, row_weights, out, lanes):
    """``out[t, w] = sum_n values[t, n, w] * row_weights[t, n]`` (B or C of one group)."""
    for t in range(steps):
        for w in range(lanes):
            out[t, w] = 0.0
        for n in range(state):
            weight = row_weights[t, n]
            for w in range(lanes):
                out[t, w] += values[t, n, w] * weight


@numba.njit(**_JIT)
def _add_decay_rate_grads(steps, state, log_decay_grads, dt_tile, dA_acc, lanes):
    """``dA_acc[n, w] += sum_t log_decay_grads[t, n, w] * dt[t, w]``."""
    for t in range(steps):
        for n in range(state):
            for w in range(lanes):
                dA_acc[n, w] += log_decay_grads[t, n, w] * dt_tile[t, w]


@numba.njit(**{**_JIT, "fastmath": True})
def _add_lane_sums(values, lane_weights, steps, target):
    """``target[t, n] += sum_w values[t, n, w] * lane_weights[t, w]`` for ``t < steps``.

    Full fast-math here: summing the lanes in any order lets LLVM vectorise the sum,
    where a strict left-to-right order costs a chain of dependent scalar additions.
    """
    for t in range(steps):
        for n in range(values.shape[1]):
            total = np.float32(0.0)
            for w in range(LANES):
                total += values[t, n, w] * lane_weights[t, w]
            target[t, n] += total


@numba.njit(parallel=True, **_JIT)
def scan_forward(u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, out, tile_states, last_state, save_states):
    """Forward selective scan.

    Args:
        u: ``(b, d, L)``.
        delta: ``(b, d, L)``, before bias and softplus.
        delta_bias: ``(d,)`` (zeros when absent).
        A: ``(d, N)``.
        Bt: ``(b, g, L, N)``, B with the sequence axis before the state axis.
        Ct: ``(b, g, L, N)``.
        D: ``(d,)`` (zeros when absent).
        z: ``(b, d, L)`` gate, read only if ``has_z``.
        softplus: Apply softplus to ``delta + delta_bias``.
        has_z: Multiply the output by ``silu(z)``.
        out: Output ``(b, d, L)``, written.
        tile_states: ``(b, d, n_tiles, N)``, written if ``save_states``: the state before
            each tile, for the backward pass.
        last_state: ``(b, d, N)``, written: the state after the last position.
        save_states: Write ``tile_states`` (skip it when no gradient is needed).
    """
    batch, dim, length = u.shape
    groups, state = Bt.shape[1], Bt.shape[3]
    n_tiles = (length + TILE - 1) // TILE
    for block in numba.prange(count_blocks(batch, dim, groups)):
        b, g, first, width = _block_channels(block, dim, groups)
        rates = _load_block_rows(A, first, width, state, LOG2E)  # exp(dt A) = 2**(dt A log2 e)
        skip = np.zeros(LANES, dtype=np.float32)
        for w in range(width):
            skip[w] = D[first + w]
        h = np.zeros((state, LANES), dtype=np.float32)
        dt_tile = np.empty((TILE, LANES), dtype=np.float32)
        u_tile = np.empty((TILE, LANES), dtype=np.float32)
        y_tile = np.empty((TILE, LANES), dtype=np.float32)
        dtu_tile = np.empty((TILE, LANES), dtype=np.float32)
        row = np.empty(TILE, dtype=np.float32)
        for k in range(n_tiles):
            t0 = k * TILE
            steps = min(TILE, length - t0)
            if save_states:
                for w in range(width):
                    for n in range(state):
                        tile_states[b, first + w, k, n] = h[n, w]
            _load_tile(u, delta, delta_bias, softplus, b, first, width, t0, steps, dt_tile, u_tile, row)
            for t in range(steps):
                for w in range(LANES):
                    y_tile[t, w] = skip[w] * u_tile[t, w]  # y starts from D * u
                    dtu_tile[t, w] = dt_tile[t, w] * u_tile[t, w]
                for n in range(state):
                    bv = Bt[b, g, t0 + t, n]
                    cv = Ct[b, g, t0 + t, n]
                    for w in range(LANES):
                        hv = fast_exp2(dt_tile[t, w] * rates[n, w]) * h[n, w] + dtu_tile[t, w] * bv
                        h[n, w] = hv
                        y_tile[t, w] += hv * cv
            for w in range(width):
                c = first + w
                if has_z:
                    for t in range(steps):
                        zv = z[b, c, t0 + t]
                        out[b, c, t0 + t] = y_tile[t, w] * zv * _sigmoid(zv)
                else:
                    for t in range(steps):
                        out[b, c, t0 + t] = y_tile[t, w]
        for w in range(width):
            for n in range(state):
                last_state[b, first + w, n] = h[n, w]


@numba.njit(parallel=True, **_JIT)
def scan_backward(
    u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, dout, tile_states, dlast_state,
    du, ddelta, dz, dA_per_batch, dD_per_batch, dBt_parts, dCt_parts, lanes,
):  # fmt: skip
    """Backward selective scan: recompute each tile from its stored state, then reverse.

    Args:
        u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z: As in :func:`scan_forward`.
        dout: Gradient of the output ``(b, d, L)``.
        tile_states: ``(b, d, n_tiles, N)`` from :func:`scan_forward`.
        dlast_state: Gradient of the last state ``(b, d, N)`` (zeros when unused).
        du: ``(b, d, L)``, written.
        ddelta: ``(b, d, L)``, written (gradient of ``delta`` before bias and softplus).
        dz: ``(b, d, L)``, written if ``has_z``.
        dA_per_batch: ``(b, d, N)``, written; sum over the batch axis for dA.
        dD_per_batch: ``(b, d)``, written; sum over the batch axis for dD.
        dBt_parts: ``(P, b, g, L, N)`` zeros; part ``p`` adds the blocks it ran. Sum over P.
        dCt_parts: ``(P, b, g, L, N)`` zeros; like ``dBt_parts``.
        lanes: :data:`LANES`, passed at run time (see the note above ``_reverse_adjoint``).
    """
    batch, dim, length = u.shape
    groups, state = Bt.shape[1], Bt.shape[3]
    n_tiles = (length + TILE - 1) // TILE
    n_blocks = count_blocks(batch, dim, groups)
    n_parts = dBt_parts.shape[0]
    for part in numba.prange(n_parts):
        rows = np.empty((TILE + 1, state, LANES), dtype=np.float32)  # rows[t + 1] = h_t
        decays = np.empty((TILE, state, LANES), dtype=np.float32)
        grad_tile = np.empty((TILE, LANES), dtype=np.float32)
        dt_tile = np.empty((TILE, LANES), dtype=np.float32)
        u_tile = np.empty((TILE, LANES), dtype=np.float32)
        dtu_tile = np.empty((TILE, LANES), dtype=np.float32)
        sum_dh_B = np.empty((TILE, LANES), dtype=np.float32)
        sum_dlog_A = np.empty((TILE, LANES), dtype=np.float32)
        row = np.empty(TILE, dtype=np.float32)
        dh_rows = np.empty((TILE, state, LANES), dtype=np.float32)
        dh = np.empty((state, LANES), dtype=np.float32)
        dA_acc = np.empty((state, LANES), dtype=np.float32)
        for block in range(part, n_blocks, n_parts):
            b, g, first, width = _block_channels(block, dim, groups)
            rates = _load_block_rows(A, first, width, state, LOG2E)
            a_rows = _load_block_rows(A, first, width, state, np.float32(1.0))
            dh[:] = 0.0
            dA_acc[:] = 0.0
            for w in range(width):
                for n in range(state):
                    dh[n, w] = dlast_state[b, first + w, n]
            dD_acc = np.zeros(LANES, dtype=np.float32)
            for k in range(n_tiles - 1, -1, -1):
                t0 = k * TILE
                steps = min(TILE, length - t0)
                _load_tile(u, delta, delta_bias, softplus, b, first, width, t0, steps, dt_tile, u_tile, row)
                # Recompute the tile forward: decays and states, and y for the gate.
                for n in range(state):
                    for w in range(LANES):
                        rows[0, n, w] = tile_states[b, first + w, k, n] if w < width else 0.0
                for t in range(steps):
                    for w in range(LANES):
                        grad_tile[t, w] = 0.0  # holds y until the gate is applied
                        dtu_tile[t, w] = dt_tile[t, w] * u_tile[t, w]
                    for n in range(state):
                        bv = Bt[b, g, t0 + t, n]
                        cv = Ct[b, g, t0 + t, n]
                        for w in range(LANES):
                            a = fast_exp2(dt_tile[t, w] * rates[n, w])
                            hv = a * rows[t, n, w] + dtu_tile[t, w] * bv
                            decays[t, n, w] = a
                            rows[t + 1, n, w] = hv
                            grad_tile[t, w] += hv * cv
                # Gradient reaching y (before the gate), and the gate's own gradient.
                for w in range(width):
                    c = first + w
                    for t in range(steps):
                        go = dout[b, c, t0 + t]
                        if has_z:
                            zv = z[b, c, t0 + t]
                            sig = _sigmoid(zv)
                            y = grad_tile[t, w] + D[c] * u_tile[t, w]
                            dz[b, c, t0 + t] = go * y * sig * (np.float32(1.0) + zv * (np.float32(1.0) - sig))
                            go = go * zv * sig
                        grad_tile[t, w] = go
                        dD_acc[w] += go * u_tile[t, w]
                for w in range(width, LANES):
                    for t in range(steps):
                        grad_tile[t, w] = 0.0
                # Reverse scan over the tile, then the gradients it feeds:
                #   d(dt A) = dh_t h_{t-1} a_t, dA += d(dt A) dt,
                #   du = dt sum_n dh_t B, d dt = u sum_n dh_t B + sum_n d(dt A) A,
                #   dB = sum_w dh_t dt u,  dC = sum_w g h_t.
                B_rows = Bt[b, g, t0:]
                _reverse_adjoint(steps, state, Ct[b, g, t0:], grad_tile, dh, decays, dh_rows, lanes)
                _log_decay_grads(steps, state, dh_rows, rows, decays, lanes)
                _add_decay_rate_grads(steps, state, decays, dt_tile, dA_acc, lanes)
                _state_sums_by_row(steps, state, dh_rows, B_rows, sum_dh_B, lanes)
                _state_sums_by_lane(steps, state, decays, a_rows, sum_dlog_A, lanes)
                _add_lane_sums(dh_rows, dtu_tile, steps, dBt_parts[part, b, g, t0:])
                _add_lane_sums(rows[1:], grad_tile, steps, dCt_parts[part, b, g, t0:])
                for w in range(width):
                    c = first + w
                    bias = delta_bias[c]
                    for t in range(steps):
                        ddt = u_tile[t, w] * sum_dh_B[t, w] + sum_dlog_A[t, w]
                        if softplus:
                            ddt *= _sigmoid(delta[b, c, t0 + t] + bias)
                        ddelta[b, c, t0 + t] = ddt
                        du[b, c, t0 + t] = dt_tile[t, w] * sum_dh_B[t, w] + D[c] * grad_tile[t, w]
            for w in range(width):
                dD_per_batch[b, first + w] = dD_acc[w]
                for n in range(state):
                    dA_per_batch[b, first + w, n] = dA_acc[n, w]
