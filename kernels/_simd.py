"""SIMD vectors for the numba kernels of the CPU scan: a ``<LANES x float>`` vector type, the intrinsics
that work on it, and a vectorised ``exp``.

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
