"""Argument checks shared by every selective-scan backend.

Bad input must fail before any kernel runs, with a message that names the argument and
the shape or dtype that was expected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ScanDims(NamedTuple):
    """Sizes of one selective-scan call."""

    batch: int
    dim: int
    length: int
    state: int
    groups: int


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> ScanDims:
    """Check types, ranks, shapes and devices of the selective-scan arguments.

    Args:
        u: ``(batch, dim, L)``.
        delta: ``(batch, dim, L)``.
        A: ``(dim, N)``.
        B: ``(batch, N, L)`` or ``(batch, groups, N, L)``.
        C: same shape as ``B``.
        D: ``(dim,)`` or None.
        z: ``(batch, dim, L)`` or None.
        delta_bias: ``(dim,)`` or None.

    Returns:
        The sizes ``(batch, dim, length, state, groups)``; ungrouped B/C count as 1 group.

    Raises:
        TypeError: An argument is not a tensor or has a dtype other than float16,
            bfloat16, float32 or float64.
        ValueError: A rank or size does not match, ``dim`` is not divisible by
            ``groups``, or the tensors are on different devices.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, tensor in named.items():
        if tensor is None and name in ("D", "z", "delta_bias"):
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"selective_scan: {name} has dtype {tensor.dtype}; expected one of "
                "float16, bfloat16, float32, float64 (cast it with .float())"
            )

    _expect_rank("u", u, 3, "(batch, dim, L)")
    batch, dim, length = u.shape
    _expect_shape("delta", delta, (batch, dim, length), "(batch, dim, L)")
    _expect_rank("A", A, 2, "(dim, N)")
    if A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must have shape (dim, N) = ({dim}, N), got {tuple(A.shape)}")
    state = A.shape[1]
    if state < 1:
        raise ValueError("selective_scan: A must have at least one state column (N >= 1)")

    if B.dim() not in (3, 4):
        raise ValueError(
            f"selective_scan: B must have shape (batch, N, L) or (batch, groups, N, L), got {tuple(B.shape)}"
        )
    if B.dim() == 3:
        groups = 1
        _expect_shape("B", B, (batch, state, length), "(batch, N, L)")
    else:
        groups = B.shape[1]
        _expect_shape("B", B, (batch, groups, state, length), "(batch, groups, N, L)")
        if groups < 1 or dim % groups != 0:
            raise ValueError(
                f"selective_scan: dim = {dim} is not divisible by groups = {groups} "
                "(B and C of shape (batch, groups, N, L) need dim % groups == 0)"
            )
    if C.shape != B.shape:
        raise ValueError(f"selective_scan: C must have the same shape as B {tuple(B.shape)}, got {tuple(C.shape)}")

    if D is not None:
        _expect_shape("D", D, (dim,), "(dim,)")
    if z is not None:
        _expect_shape("z", z, (batch, dim, length), "(batch, dim, L)")
    if delta_bias is not None:
        _expect_shape("delta_bias", delta_bias, (dim,), "(dim,)")

    for name, tensor in named.items():
        if tensor is not None and tensor.device != u.device:
            raise ValueError(
                f"selective_scan: {name} is on {tensor.device} but u is on {u.device}; move all arguments to one device"
            )
    return ScanDims(batch, dim, length, state, groups)


def _expect_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    if tensor.dim() != rank:
        raise ValueError(f"selective_scan: {name} must have shape {layout}, got {tuple(tensor.shape)}")


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"selective_scan: {name} must have shape {layout} = {shape}, got {tuple(tensor.shape)}")
