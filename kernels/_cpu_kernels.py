"""Numba kernels of the fast CPU selective scan (forward and backward).

Two layouts of the work, both one SIMD lane per value:

- lanes over states (N == ``LANES``; ``cpu.py`` pads smaller states with states whose
  A, B and C are 0, which stay 0): one channel at a time, its whole state in one vector
  that stays in registers along the sequence. u, delta and the outputs are read and
  written in their own layout (no transposes), B and C come as ``(L, N)`` rows, and the
  sums over states (``y_t = <C_t, h_t>``, and in the backward those that du and ddelta
  need) are reduced for ``LANES`` positions at once by :func:`vrowsums`.
- lanes over channels (any N; ``cpu.py`` uses it for N > ``LANES``, and for inference
  with very few states, where it is faster): the channels of one group (they
  share B and C) are cut into blocks of ``LANES`` channels scanned together, one lane
  per channel, state by state. A tile of ``TILE`` positions of u and delta is first
  transposed into small lane-major buffers that stay in cache.

The forward stores the state at the start of every tile of ``TILE`` positions, so the
backward recomputes one tile at a time instead of keeping the whole ``(b, d, L, N)``
history.

The vector type, its intrinsics and the vectorised ``exp`` the kernels use are in
:mod:`._simd`.

Every kernel takes float32, C-contiguous arrays; the torch wrapper in ``cpu.py``
prepares them.
"""

from __future__ import annotations

import numba
import numpy as np

from ._simd import (
    _JIT,
    LANES,
    LOG2E,
    _sigmoid,
    _softplus,
    fast_exp2,
    vexp2,
    vload,
    vload_upto,
    vmuladd,
    vrowsums,
    vsilu_gate,
    vsoftplus,
    vsplat,
    vsplat_at,
    vstore,
    vstore_first,
)

__all__ = ["LANES", "SPAN", "TILE", "count_blocks", "scan_backward", "scan_forward", "sequence_major"]

TILE = 64
"""Sequence positions per tile; the forward pass stores the state every TILE steps."""

SPAN = 1024
"""Positions of one channel the lanes-over-states forward scans in one go (a multiple of
TILE): their step sizes are computed first, in a loop of independent vectors, and the
span's B and C rows (128 KB) stay in the L2 cache for the block's channels."""

# ---------------------------------------------------------------------------------------


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
    kernel = forward_over_states if A.shape[1] == LANES else forward_over_channels
    kernel(u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, out, tile_states, last_state, save_states)


@numba.njit(**_JIT)
def _span_step_sizes(u, delta, row, t0, steps, bias, softplus, dt_span, dtu_span):
    """``dt`` and ``dt * u`` of positions ``t0 .. t0 + steps`` of one channel into ``dt_span`` and ``dtu_span``.

    ``row`` is the flat index of the channel's position 0 in ``u`` and ``delta``; the
    vectors are independent, so their long softplus chains overlap.
    """
    for i in range(0, steps, LANES):
        count = min(LANES, steps - i)
        dt = vload_upto(delta, row + t0 + i, count) + bias
        if softplus:
            dt = vsoftplus(dt)
        vstore(dt_span, i, dt)
        vstore(dtu_span, i, dt * vload_upto(u, row + t0 + i, count))


@numba.njit(parallel=True, **_JIT)
def forward_over_states(
    u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, out, tile_states, last_state, save_states
):
    """:func:`scan_forward` for N == LANES, one vector per state (see the module docstring).

    Each block of channels (as in the other layout) walks the sequence span by span; for
    every channel of the block the state vector stays in registers along the span, and
    every LANES positions their ``h_t * C_t`` rows are reduced to ``y`` at once.
    """
    batch, dim, length = u.shape
    groups = Bt.shape[1]
    n_tiles = tile_states.shape[2]
    for block in numba.prange(count_blocks(batch, dim, groups)):
        b, g, first, width = _block_channels(block, dim, groups)
        states = np.zeros((LANES, LANES), dtype=np.float32)  # states[w]: the state of channel first + w
        rates = np.zeros((LANES, LANES), dtype=np.float32)  # rates[w]: A[first + w] log2(e)
        for w in range(width):
            for n in range(LANES):
                rates[w, n] = A[first + w, n] * LOG2E
        dt_span = np.empty(SPAN, dtype=np.float32)
        dtu_span = np.empty(SPAN, dtype=np.float32)
        products = np.zeros((LANES, LANES), dtype=np.float32)  # products[j]: h_t * C_t of position t0 + j
        for s0 in range(0, length, SPAN):
            span = min(SPAN, length - s0)
            for w in range(width):
                c = first + w
                row = (b * dim + c) * length
                _span_step_sizes(u, delta, row, s0, span, vsplat(delta_bias[c]), softplus, dt_span, dtu_span)
                h = vload(states, w * LANES)
                rate = vload(rates, w * LANES)
                for i in range(0, span, LANES):
                    t0 = s0 + i
                    steps = min(LANES, span - i)
                    if save_states and t0 % TILE == 0:
                        vstore(tile_states, ((b * dim + c) * n_tiles + t0 // TILE) * LANES, h)
                    bc_row = ((b * groups + g) * length + t0) * LANES
                    for j in range(steps):
                        a = vexp2(vsplat_at(dt_span, i + j) * rate)
                        h = vmuladd(a, h, vsplat_at(dtu_span, i + j) * vload(Bt, bc_row + j * LANES))
                        vstore(products, j * LANES, h * vload(Ct, bc_row + j * LANES))
                    y = vmuladd(vsplat(D[c]), vload_upto(u, row + t0, steps), vrowsums(products))
                    if has_z:
                        y = vsilu_gate(y, vload_upto(z, row + t0, steps))
                    if steps == LANES:
                        vstore(out, row + t0, y)
                    else:
                        vstore_first(out, row + t0, steps, y)
                vstore(states, w * LANES, h)
        for w in range(width):
            vstore(last_state, (b * dim + first + w) * LANES, vload(states, w * LANES))


@numba.njit(parallel=True, **_JIT)
def forward_over_channels(
    u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, out, tile_states, last_state, save_states
):
    """:func:`scan_forward` for any N, one lane per channel of a block (see the module docstring)."""
    batch, dim, length = u.shape
    groups, state = Bt.shape[1], Bt.shape[3]
    n_tiles = (length + TILE - 1) // TILE
    for block in numba.prange(count_blocks(batch, dim, groups)):
        b, g, first, width = _block_channels(block, dim, groups)
        rates = _load_block_rows(A, first, width, state, LOG2E)  # exp(dt A) = 2**(dt A log2 e)
        skip_row = np.zeros(LANES, dtype=np.float32)
        for w in range(width):
            skip_row[w] = D[first + w]
        skip = vload(skip_row, 0)
        h = np.zeros((state, LANES), dtype=np.float32)
        dt_tile = np.empty((TILE, LANES), dtype=np.float32)
        u_tile = np.empty((TILE, LANES), dtype=np.float32)
        y_tile = np.empty((TILE, LANES), dtype=np.float32)
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
                dt = vload(dt_tile, t * LANES)
                ut = vload(u_tile, t * LANES)
                dtu = dt * ut
                y = skip * ut  # y starts from D * u
                bc_row = ((b * groups + g) * length + t0 + t) * state
                for n in range(state):
                    a = vexp2(dt * vload(rates, n * LANES))
                    hv = vmuladd(a, vload(h, n * LANES), dtu * vsplat_at(Bt, bc_row + n))
                    vstore(h, n * LANES, hv)
                    y = vmuladd(hv, vsplat_at(Ct, bc_row + n), y)
                vstore(y_tile, t * LANES, y)
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
def sequence_major(BC, out):
    """``out[b, g, t, n] = BC[b, g, n, t]``: B or C with the sequence axis before the state axis.

    ``out`` may carry more states than ``BC`` (``(b, g, L, width)``, width >= N): those get zeros.
    """
    batch, groups, state, length = BC.shape
    width = out.shape[3]
    for bg in numba.prange(batch * groups):
        b, g = bg // groups, bg % groups
        for t0 in range(0, length, TILE):
            for n in range(width):
                for t in range(t0, min(t0 + TILE, length)):
                    out[b, g, t, n] = BC[b, g, n, t] if n < state else np.float32(0.0)


def scan_backward(
    u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, dout, tile_states, dlast_state,
    du, ddelta, dz, dA_per_batch, dD_per_batch, dBt_parts, dCt_parts,
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
    """
    args = (u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, dout, tile_states, dlast_state)
    grads = (du, ddelta, dz, dA_per_batch, dD_per_batch, dBt_parts, dCt_parts)
    if A.shape[1] == LANES:
        backward_over_states(*args, *grads)
    else:
        backward_over_channels(*args, *grads, LANES)


@numba.njit(parallel=True, **_JIT)
def backward_over_states(
    u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, dout, tile_states, dlast_state,
    du, ddelta, dz, dA_per_batch, dD_per_batch, dBt_parts, dCt_parts,
):  # fmt: skip
    """:func:`scan_backward` for N == LANES, one vector per state (see the module docstring).

    Blocks of channels as in the forward; the sequence is walked tile by tile from the
    end, and within a tile channel by channel: recompute the tile's states and decays
    from the saved state, then run the adjoint back through the tile with the state's
    gradient in registers. The block's channels add their dB and dC of the tile into
    small buffers that stay in cache, added to the part's sums once per tile; the sums
    over states that du and ddelta need are reduced LANES positions at a time.
    """
    batch, dim, length = u.shape
    groups = Bt.shape[1]
    n_tiles = tile_states.shape[2]
    n_blocks = count_blocks(batch, dim, groups)
    n_parts = dBt_parts.shape[0]
    for part in numba.prange(n_parts):
        states = np.empty((TILE + 1) * LANES, dtype=np.float32)  # h before the tile, then h_t at (t + 1) * LANES
        decays = np.empty(TILE * LANES, dtype=np.float32)
        dt_tile = np.empty(TILE, dtype=np.float32)
        dtu_tile = np.empty(TILE, dtype=np.float32)
        grad_tile = np.empty(TILE, dtype=np.float32)  # gradient reaching y_t (after the gate)
        dB_tile = np.empty(TILE * LANES, dtype=np.float32)
        dC_tile = np.empty(TILE * LANES, dtype=np.float32)
        products = np.zeros((LANES, LANES), dtype=np.float32)  # rows to reduce with vrowsums
        more_products = np.zeros((LANES, LANES), dtype=np.float32)
        # Per channel w of the block: A log2(e), A, the state's gradient carried back, the
        # partial sums of dA and of dD (by lane).
        rates = np.zeros((LANES, LANES), dtype=np.float32)
        a_rows = np.zeros((LANES, LANES), dtype=np.float32)
        adjoints = np.zeros((LANES, LANES), dtype=np.float32)
        dA_rows = np.zeros((LANES, LANES), dtype=np.float32)
        dD_rows = np.zeros((LANES, LANES), dtype=np.float32)
        for block in range(part, n_blocks, n_parts):
            b, g, first, width = _block_channels(block, dim, groups)
            for w in range(width):
                c = first + w
                for n in range(LANES):
                    rates[w, n] = A[c, n] * LOG2E
                    a_rows[w, n] = A[c, n]
                    adjoints[w, n] = dlast_state[b, c, n]
                    dA_rows[w, n] = 0.0
                    dD_rows[w, n] = 0.0
            for k in range(n_tiles - 1, -1, -1):
                t0 = k * TILE
                steps = min(TILE, length - t0)
                dB_tile[:] = 0.0
                dC_tile[:] = 0.0
                for w in range(width):
                    c = first + w
                    row = (b * dim + c) * length + t0  # flat index of position t0 of the channel
                    bc_row = ((b * groups + g) * length + t0) * LANES
                    bias = vsplat(delta_bias[c])
                    _span_step_sizes(u, delta, row - t0, t0, steps, bias, softplus, dt_tile, dtu_tile)
                    h = vload(tile_states, ((b * dim + c) * n_tiles + k) * LANES)
                    _recompute_tile(h, vload(rates, w * LANES), Bt, bc_row, steps, dt_tile, dtu_tile, states, decays)
                    dD = _output_gradients(
                        dout, u, z, has_z, Ct, D[c], row, bc_row, steps, states, products, grad_tile, dz,
                        vload(dD_rows, w * LANES),
                    )  # fmt: skip
                    vstore(dD_rows, w * LANES, dD)
                    dh, dA = _reverse_tile(
                        u, delta, bias, softplus, Bt, Ct, D[c], row, bc_row, steps, states, decays,
                        dt_tile, dtu_tile, grad_tile, dB_tile, dC_tile, products, more_products,
                        vload(a_rows, w * LANES), vload(adjoints, w * LANES), vload(dA_rows, w * LANES), du, ddelta,
                    )  # fmt: skip
                    vstore(adjoints, w * LANES, dh)
                    vstore(dA_rows, w * LANES, dA)
                sums = (((part * batch + b) * groups + g) * length + t0) * LANES
                for i in range(0, steps * LANES, LANES):
                    vstore(dBt_parts, sums + i, vload(dBt_parts, sums + i) + vload(dB_tile, i))
                    vstore(dCt_parts, sums + i, vload(dCt_parts, sums + i) + vload(dC_tile, i))
            for w in range(width):
                c = first + w
                vstore(dA_per_batch, (b * dim + c) * LANES, vload(dA_rows, w * LANES))
                total = np.float32(0.0)
                for n in range(LANES):
                    total += dD_rows[w, n]
                dD_per_batch[b, c] = total


@numba.njit(inline="always", **_JIT)
def _recompute_tile(h, rate, Bt, bc_row, steps, dt_tile, dtu_tile, states, decays):
    """The tile's states from ``h`` before it: ``states[(t + 1) * LANES] = h_t``, ``decays[t * LANES] = a_t``."""
    vstore(states, 0, h)
    for t in range(steps):
        a = vexp2(vsplat_at(dt_tile, t) * rate)
        h = vmuladd(a, h, vsplat_at(dtu_tile, t) * vload(Bt, bc_row + t * LANES))
        vstore(decays, t * LANES, a)
        vstore(states, (t + 1) * LANES, h)


@numba.njit(inline="always", **_JIT)
def _output_gradients(dout, u, z, has_z, Ct, skip, row, bc_row, steps, states, products, grad_tile, dz, dD):
    """The gradient reaching y over a tile into ``grad_tile`` (through the gate, whose own gradient goes
    to ``dz``); returns ``dD`` plus its part, by lane."""
    one = vsplat(np.float32(1.0))
    for i in range(0, steps, LANES):
        count = min(LANES, steps - i)
        grad = vload_upto(dout, row + i, count)
        uv = vload_upto(u, row + i, count)
        if has_z:
            for j in range(count):
                t = i + j
                vstore(products, j * LANES, vload(states, (t + 1) * LANES) * vload(Ct, bc_row + t * LANES))
            y = vmuladd(vsplat(skip), uv, vrowsums(products))
            zv = vload_upto(z, row + i, count)
            sig = one / (one + vexp2(vsplat(-LOG2E) * zv))
            _store_upto(dz, row + i, count, grad * y * sig * vmuladd(zv, one - sig, one))
            grad = grad * zv * sig
        vstore(grad_tile, i, grad)
        dD = vmuladd(grad, uv, dD)
    return dD


@numba.njit(inline="always", **_JIT)
def _reverse_tile(
    u, delta, bias, softplus, Bt, Ct, skip, row, bc_row, steps, states, decays,
    dt_tile, dtu_tile, grad_tile, dB_tile, dC_tile, products, more_products, a_row, dh, dA, du, ddelta,
):  # fmt: skip
    """Back through a tile, last position first; returns the state's gradient carried to the
    tile before (``a_{t0} dh_{t0}``) and ``dA`` plus the tile's part.

    dh_t = g_t C_t + a_{t+1} dh_{t+1}; dC_t += g_t h_t; dB_t += dh_t dt_t u_t;
    d(dt_t A) = dh_t h_{t-1} a_t, dA += d(dt_t A) dt_t;
    du_t = dt_t sum(dh_t B_t) + D g_t; d dt_t = u_t sum(dh_t B_t) + sum(d(dt_t A) A).
    """
    one = vsplat(np.float32(1.0))
    for i in range(((steps - 1) // LANES) * LANES, -1, -LANES):
        count = min(LANES, steps - i)
        for j in range(count - 1, -1, -1):
            t = i + j
            grad = vsplat_at(grad_tile, t)
            bc = bc_row + t * LANES
            dh = vmuladd(grad, vload(Ct, bc), dh)
            vstore(dC_tile, t * LANES, vmuladd(vload(states, (t + 1) * LANES), grad, vload(dC_tile, t * LANES)))
            vstore(dB_tile, t * LANES, vmuladd(dh, vsplat_at(dtu_tile, t), vload(dB_tile, t * LANES)))
            vstore(products, j * LANES, dh * vload(Bt, bc))
            a = vload(decays, t * LANES)
            dlog = dh * vload(states, t * LANES) * a
            dA = vmuladd(dlog, vsplat_at(dt_tile, t), dA)
            vstore(more_products, j * LANES, dlog * a_row)
            dh = dh * a
        dh_B = vrowsums(products)
        ddt = vmuladd(vload_upto(u, row + i, count), dh_B, vrowsums(more_products))
        if softplus:
            x = vload_upto(delta, row + i, count) + bias
            ddt = ddt / (one + vexp2(vsplat(-LOG2E) * x))  # times sigmoid(x)
        _store_upto(ddelta, row + i, count, ddt)
        _store_upto(du, row + i, count, vmuladd(vload(dt_tile, i), dh_B, vsplat(skip) * vload(grad_tile, i)))
    return dh, dA


@numba.njit(inline="always", **_JIT)
def _store_upto(arr, index, count, value):
    """``arr.flat[index:index + count] = value[:count]`` (``count <= LANES``)."""
    if count == LANES:
        vstore(arr, index, value)
    else:
        vstore_first(arr, index, count, value)


@numba.njit(parallel=True, **_JIT)
def backward_over_channels(
    u, delta, delta_bias, A, Bt, Ct, D, z, softplus, has_z, dout, tile_states, dlast_state,
    du, ddelta, dz, dA_per_batch, dD_per_batch, dBt_parts, dCt_parts, lanes,
):  # fmt: skip
    """:func:`scan_backward` for any N, one lane per channel of a block (see the module docstring).

    ``lanes`` is :data:`LANES`, passed at run time (see the note above ``_reverse_adjoint``);
    the other arguments are those of :func:`scan_backward`.
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
