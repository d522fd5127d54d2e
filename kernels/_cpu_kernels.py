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

Except in the lanes-over-channels backward, whose loops over lanes LLVM vectorises, the
kernels are written with a small numba vector type (``<LANES x float>`` in LLVM: two AVX2
registers, one AVX-512 register, four NEON registers; LLVM lowers it for the machine)
and intrinsics that emit the LLVM instructions directly: loads and stores, lane-wise
arithmetic without fast-math flags (so nothing is reassociated), and FMA through
``llvm.fmuladd`` (fused where the machine has it). LLVM's own vectoriser handles these
short loops badly (run-time alias checks, constants reloaded every iteration).

``exp`` is not vectorised by LLVM without a vector math library, so the kernels use
their own: ``2**x = 2**f * 2**k`` with ``k = round(x)`` found by adding ``1.5 * 2**23``
(which also leaves ``k`` in the low bits of the sum), a degree-5 polynomial for ``2**f``
on ``[-0.5, 0.5]`` (exact at 0 with slope ``ln 2``, relative error 1.1e-7 before float32
rounding) and ``2**k`` added to the float's exponent bits. Every decay is
``exp(dt * A)`` of one step, never a product over many steps or its inverse, so nothing
overflows for trained models (A down to -16, dt up to 5).

Every kernel takes float32, C-contiguous arrays; the torch wrapper in ``cpu.py``
prepares them.
"""

from __future__ import annotations

import operator

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

LANES = 16
"""SIMD lanes (two AVX2 vectors of float32): the channels scanned together, or the states
of the lanes-over-states kernels."""

TILE = 64
"""Sequence positions per tile; the forward pass stores the state every TILE steps."""

SPAN = 1024
"""Positions of one channel the lanes-over-states forward scans in one go (a multiple of
TILE): their step sizes are computed first, in a loop of independent vectors, and the
span's B and C rows (128 KB) stay in the L2 cache for the block's channels."""

LOG2E = np.float32(1.4426950408889634)

# 2**f = 1 + f (ln 2 + f (Q2 + f (Q3 + f (Q4 + f Q5)))) on [-0.5, 0.5]: a minimax fit
# (Lawson iterations on 4000 Chebyshev nodes, relative error) with the first two
# coefficients fixed, so small steps (long memories) keep their decay exact to first
# order; maximum relative error 1.05e-7 in float64. tests/kernels/test_cpu_scan.py
# checks the float32 results against exp2.
_EXP2_POLY = (
    1.0,
    0.6931471805599453,
    0.24022281607295712,
    0.05550559994326642,
    0.009669708427610002,
    0.0013300264165021624,
)
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5 = (np.float32(c) for c in _EXP2_POLY)
_ROUNDER = np.float32(12582912.0)
"""``1.5 * 2**23``: ``x + _ROUNDER`` rounds ``x`` (|x| < 2**22) to an integer ``k`` held in
the low mantissa bits of the sum, so ``(sum bits) << 23`` are ``k``'s exponent bits."""

# Fast-math without reassociation: contraction into FMA and the like are welcome, but
# reordering ``(x + _ROUNDER) - _ROUNDER`` would break fast_exp2.
_FASTMATH = {"nsz", "arcp", "contract", "afn"}
# error_model="numpy": float division without the ZeroDivisionError check, whose branch
# keeps LLVM from vectorising the loops that divide (softplus, sigmoid).
_JIT = {"fastmath": _FASTMATH, "error_model": "numpy", "cache": True, "nogil": True}


def _scale_by_exponent_bits(builder, p, rounded):
    """``p * 2**k`` for float32 ``p`` in [0.5, 2) and ``rounded = k + _ROUNDER``, in int32 instructions."""
    int_type = ir.IntType(32) if isinstance(p.type, ir.FloatType) else ir.VectorType(ir.IntType(32), p.type.count)
    shift = (
        ir.Constant(int_type, 23) if isinstance(int_type, ir.IntType) else ir.Constant(int_type, [23] * int_type.count)
    )
    exponent = builder.shl(builder.bitcast(rounded, int_type), shift)
    return builder.bitcast(builder.add(builder.bitcast(p, int_type), exponent), p.type)


@intrinsic
def _times_pow2(typingctx, p, rounded):
    """Scalar ``p * 2**k`` from ``rounded = k + _ROUNDER`` (see :func:`_scale_by_exponent_bits`)."""
    if p != types.float32 or rounded != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _scale_by_exponent_bits(builder, args[0], args[1])

    return types.float32(types.float32, types.float32), codegen


@numba.njit(inline="always", **_JIT)
def fast_exp2(x):
    """``2**x`` in float32 for ``x`` in ``[-125, 127]`` (clamped outside), vectorisable."""
    x = min(max(x, np.float32(-125.0)), np.float32(127.0))
    rounded = x + _ROUNDER
    f = x - (rounded - _ROUNDER)  # in [-0.5, 0.5], exact
    p = _Q5 * f + _Q4
    p = p * f + _Q3
    p = p * f + _Q2
    p = p * f + _Q1
    p = p * f + _Q0
    return _times_pow2(p, rounded)


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


# ---------------------------------------------------------------------------------------
# Vectors of LANES float32 values for numba, and the intrinsics that work on them.


class _Float32Vector(types.Type):
    """The numba type of a ``<LANES x float>`` LLVM vector."""

    def __init__(self):
        super().__init__(name=f"float32x{LANES}")


@register_model(_Float32Vector)
class _Float32VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.FloatType(), LANES))


_VECTOR = _Float32Vector()
_LL_VECTOR = ir.VectorType(ir.FloatType(), LANES)
_LL_I32 = ir.IntType(32)
_LL_I32_VECTOR = ir.VectorType(_LL_I32, LANES)


def _constant(value):
    return ir.Constant(_LL_VECTOR, [float(value)] * LANES)


def _is_float32_array(arr):
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.layout == "C"


def _element_pointer(context, builder, arr_type, arr, index, index_type):
    """Pointer to ``arr.flat[index]`` (no wraparound of negative indices, no bounds check)."""
    data = context.make_array(arr_type)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, index, index_type, types.intp)], inbounds=True)


def _vector_pointer(context, builder, signature, args):
    ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
    return builder.bitcast(ptr, _LL_VECTOR.as_pointer())


def _splat(builder, scalar):
    undef = ir.Constant(_LL_VECTOR, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(_LL_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(_LL_I32_VECTOR, [0] * LANES))


def _fmuladd(builder):
    fnty = ir.FunctionType(_LL_VECTOR, [_LL_VECTOR] * 3)
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fmuladd.v{LANES}f32")


def _first_lanes(context, builder, count, count_type):
    """``<LANES x i1>`` mask of the lanes below ``count``."""
    count = builder.trunc(context.cast(builder, count, count_type, types.int64), _LL_I32)
    undef = ir.Constant(_LL_I32_VECTOR, ir.Undefined)
    counts = builder.shuffle_vector(
        builder.insert_element(undef, count, ir.Constant(_LL_I32, 0)), undef, ir.Constant(_LL_I32_VECTOR, [0] * LANES)
    )
    return builder.icmp_signed("<", ir.Constant(_LL_I32_VECTOR, list(range(LANES))), counts)


def _masked_intrinsic_name(operation, ptr):
    """``llvm.masked.<operation>`` for a vector pointer, mangled as the IR prints pointers:
    ``ptr`` (opaque pointers, llvmlite >= 0.44) or ``<LANES x float>*`` (older llvmlite)."""
    pointer = "p0" if str(ptr.type) == "ptr" else f"p0v{LANES}f32"
    return f"llvm.masked.{operation}.v{LANES}f32.{pointer}"


def _is_index(value):
    return isinstance(value, types.Integer)


@intrinsic
def vload(typingctx, arr, index):
    """``arr.flat[index:index + LANES]`` as a vector."""
    if not (_is_float32_array(arr) and _is_index(index)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_vector_pointer(context, builder, signature, args), align=4)

    return _VECTOR(arr, index), codegen


@intrinsic
def vstore(typingctx, arr, index, value):
    """``arr.flat[index:index + LANES] = value``."""
    if not (_is_float32_array(arr) and _is_index(index) and value == _VECTOR):
        return None

    def codegen(context, builder, signature, args):
        builder.store(args[2], _vector_pointer(context, builder, signature, args), align=4)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def vload_first(typingctx, arr, index, count):
    """``arr.flat[index:index + count]`` in the first ``count`` lanes, zeros after; reads nothing more."""
    if not (_is_float32_array(arr) and _is_index(index) and _is_index(count)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _vector_pointer(context, builder, signature, args)
        mask = _first_lanes(context, builder, args[2], signature.args[2])
        fnty = ir.FunctionType(_LL_VECTOR, [ptr.type, _LL_I32, mask.type, _LL_VECTOR])
        load = cgutils.get_or_insert_function(builder.module, fnty, _masked_intrinsic_name("load", ptr))
        return builder.call(load, [ptr, ir.Constant(_LL_I32, 4), mask, _constant(0.0)])

    return _VECTOR(arr, index, count), codegen


@intrinsic
def vstore_first(typingctx, arr, index, count, value):
    """``arr.flat[index:index + count] = value[:count]``; writes nothing more."""
    if not (_is_float32_array(arr) and _is_index(index) and _is_index(count) and value == _VECTOR):
        return None

    def codegen(context, builder, signature, args):
        ptr = _vector_pointer(context, builder, signature, args)
        mask = _first_lanes(context, builder, args[2], signature.args[2])
        fnty = ir.FunctionType(ir.VoidType(), [_LL_VECTOR, ptr.type, _LL_I32, mask.type])
        store = cgutils.get_or_insert_function(builder.module, fnty, _masked_intrinsic_name("store", ptr))
        builder.call(store, [args[3], ptr, ir.Constant(_LL_I32, 4), mask])
        return context.get_dummy_value()

    return types.none(arr, index, count, value), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector with the float32 ``x`` in every lane."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _splat(builder, args[0])

    return _VECTOR(x), codegen


@intrinsic
def vsplat_at(typingctx, arr, index):
    """A vector with ``arr.flat[index]`` in every lane (one broadcast load)."""
    if not (_is_float32_array(arr) and _is_index(index)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        return _splat(builder, builder.load(ptr, align=4))

    return _VECTOR(arr, index), codegen


def _lanewise(instruction):
    @intrinsic
    def lanewise(typingctx, a, b):
        if not (a == _VECTOR and b == _VECTOR):
            return None

        def codegen(context, builder, signature, args):
            return getattr(builder, instruction)(args[0], args[1])

        return _VECTOR(a, b), codegen

    return lanewise


def _overload_operator(python_operator, lanewise):
    def typer(a, b):
        if a == _VECTOR and b == _VECTOR:
            return lambda a, b: lanewise(a, b)
        return None

    overload(python_operator)(typer)


for _python_operator, _instruction in (
    (operator.add, "fadd"),
    (operator.sub, "fsub"),
    (operator.mul, "fmul"),
    (operator.truediv, "fdiv"),
):
    _overload_operator(_python_operator, _lanewise(_instruction))


@intrinsic
def vmuladd(typingctx, a, b, c):
    """``a * b + c`` lane by lane, fused where the machine has FMA."""
    if not (a == _VECTOR and b == _VECTOR and c == _VECTOR):
        return None

    def codegen(context, builder, signature, args):
        return builder.call(_fmuladd(builder), args)

    return _VECTOR(a, b, c), codegen


@intrinsic
def vmax(typingctx, a, b):
    """``max(a, b)`` lane by lane (``b`` where ``a`` is NaN)."""
    if not (a == _VECTOR and b == _VECTOR):
        return None

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return _VECTOR(a, b), codegen


@intrinsic
def vabs(typingctx, a):
    """``|a|`` lane by lane."""
    if a != _VECTOR:
        return None

    def codegen(context, builder, signature, args):
        bits = builder.and_(builder.bitcast(args[0], _LL_I32_VECTOR), ir.Constant(_LL_I32_VECTOR, [0x7FFFFFFF] * LANES))
        return builder.bitcast(bits, _LL_VECTOR)

    return _VECTOR(a), codegen


@intrinsic
def vexp2(typingctx, x):
    """``2**x`` lane by lane, as :func:`fast_exp2` (``x`` clamped to [-125, 127])."""
    if x != _VECTOR:
        return None

    def codegen(context, builder, signature, args):
        fmuladd = _fmuladd(builder)
        x = args[0]
        x = builder.select(builder.fcmp_ordered(">", x, _constant(-125.0)), x, _constant(-125.0))
        x = builder.select(builder.fcmp_ordered("<", x, _constant(127.0)), x, _constant(127.0))
        rounded = builder.fadd(x, _constant(_ROUNDER))
        f = builder.fsub(x, builder.fsub(rounded, _constant(_ROUNDER)))
        p = _constant(_EXP2_POLY[-1])
        for coefficient in _EXP2_POLY[-2::-1]:
            p = builder.call(fmuladd, [p, f, _constant(np.float32(coefficient))])
        return _scale_by_exponent_bits(builder, p, rounded)

    return _VECTOR(x), codegen


@intrinsic
def vrowsums(typingctx, rows):
    """The sums of the LANES rows of a ``(LANES, LANES)`` array, as one vector (lane i: row i).

    Halves of every row are added first, then pairs of rows as x86's ``vhaddps`` does
    (within 128-bit halves), and a final exchange of halves puts the sums in order.
    """
    if not _is_float32_array(rows):
        return None

    def codegen(context, builder, signature, args):
        half = LANES // 2
        base = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data,
                               _LL_VECTOR.as_pointer())  # fmt: skip

        def shuffle(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_LL_I32, len(mask)), mask))

        def pair_sums(a, b):  # [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]
            return builder.fadd(shuffle(a, b, [0, 2, 8, 10, 4, 6, 12, 14]), shuffle(a, b, [1, 3, 9, 11, 5, 7, 13, 15]))

        halves = []
        for i in range(LANES):
            row = builder.load(builder.gep(base, [ir.Constant(_LL_I32, i)]), align=4)
            halves.append(
                builder.fadd(shuffle(row, row, list(range(half))), shuffle(row, row, list(range(half, LANES))))
            )
        eights = []
        for r in (halves[:8], halves[8:]):
            quads = [pair_sums(r[0], r[1]), pair_sums(r[2], r[3]), pair_sums(r[4], r[5]), pair_sums(r[6], r[7])]
            octs = [pair_sums(quads[0], quads[1]), pair_sums(quads[2], quads[3])]
            low = shuffle(octs[0], octs[1], [0, 1, 2, 3, 8, 9, 10, 11])
            high = shuffle(octs[0], octs[1], [4, 5, 6, 7, 12, 13, 14, 15])
            eights.append(builder.fadd(low, high))
        return shuffle(eights[0], eights[1], list(range(LANES)))

    return _VECTOR(rows), codegen


assert LANES == 16, "vrowsums is written for 16 lanes"


@numba.njit(inline="always", **_JIT)
def vsoftplus(x):
    """``log(1 + e**x)`` lane by lane, as :func:`_softplus`."""
    e = vexp2(vsplat(-LOG2E) * vabs(x))
    s = e / (vsplat(np.float32(2.0)) + e)
    s2 = s * s
    series = vmuladd(vsplat(np.float32(1.0 / 11.0)), s2, vsplat(np.float32(1.0 / 9.0)))
    series = vmuladd(series, s2, vsplat(np.float32(1.0 / 7.0)))
    series = vmuladd(series, s2, vsplat(np.float32(1.0 / 5.0)))
    series = vmuladd(series, s2, vsplat(np.float32(1.0 / 3.0)))
    series = vmuladd(series, s2, vsplat(np.float32(1.0)))
    return vmuladd(vsplat(np.float32(2.0)) * s, series, vmax(x, vsplat(np.float32(0.0))))


@numba.njit(inline="always", **_JIT)
def vsilu_gate(y, z):
    """``y * z * sigmoid(z)`` lane by lane."""
    return y * z / (vsplat(np.float32(1.0)) + vexp2(vsplat(-LOG2E) * z))


@numba.njit(inline="always", **_JIT)
def vload_upto(arr, index, count):
    """``arr.flat[index:index + count]`` (``count <= LANES``), zeros in the lanes past ``count``."""
    if count == LANES:
        return vload(arr, index)
    return vload_first(arr, index, count)


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
