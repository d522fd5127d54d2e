"""Random inputs and error measures for testing and benchmarking selective-scan backends.

The distributions follow mamba_ssm's own tests: ``A = -(0.5 + U[0, 1))``,
``delta = 0.5 * U[0, 1)``, ``delta_bias = 0.5 * U[0, 1)``, and standard normal ``u``,
``B``, ``C``, ``D``, ``z``. ``trained_ranges=True`` draws the ranges met in trained
models instead: ``A`` log-uniform in ``[-16, -0.01]`` and ``delta`` up to 5.
"""

from __future__ import annotations

import math

import torch

SCAN_TENSOR_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def random_scan_inputs(
    batch: int,
    dim: int,
    state: int,
    length: int,
    groups: int | None = None,
    *,
    with_D: bool = True,
    with_z: bool = True,
    with_delta_bias: bool = True,
    trained_ranges: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Draw the tensor arguments of ``selective_scan``.

    Args:
        batch, dim, state, length: Sizes ``b``, ``d``, ``N``, ``L``.
        groups: None for B/C of shape ``(b, N, L)``, else ``(b, groups, N, L)``.
        with_D, with_z, with_delta_bias: Draw the optional tensors (else None).
        trained_ranges: Draw ``A`` log-uniform in [-16, -0.01] and ``delta`` in [0, 5].
        dtype: dtype of ``u``, ``delta``, ``B``, ``C``, ``z``; ``A``, ``D`` and
            ``delta_bias`` stay float32 (float64 when ``dtype`` is float64), as in mamba_ssm.
        device: Device of every tensor.
        seed: Seed of the generator.

    Returns:
        ``{name: tensor or None}`` keyed by :data:`SCAN_TENSOR_NAMES`.
    """
    gen = torch.Generator().manual_seed(seed)
    weight_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def draw(*shape, kind="normal", dtype=dtype):
        x = torch.randn(shape, generator=gen) if kind == "normal" else torch.rand(shape, generator=gen)
        return x.to(dtype=dtype, device=device)

    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    if trained_ranges:
        log_a = draw(dim, state, kind="uniform", dtype=torch.float64) * (math.log(16) - math.log(0.01))
        A = -torch.exp(log_a + math.log(0.01)).to(weight_dtype)
        delta = 5.0 * draw(batch, dim, length, kind="uniform")
    else:
        A = -(0.5 + draw(dim, state, kind="uniform", dtype=weight_dtype))
        delta = 0.5 * draw(batch, dim, length, kind="uniform")
    return {
        "u": draw(batch, dim, length),
        "delta": delta,
        "A": A,
        "B": draw(*bc_shape),
        "C": draw(*bc_shape),
        "D": draw(dim, dtype=weight_dtype) if with_D else None,
        "z": draw(batch, dim, length) if with_z else None,
        "delta_bias": 0.5 * draw(dim, kind="uniform", dtype=weight_dtype) if with_delta_bias else None,
    }


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64; the plain norm if the reference is 0."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    diff = torch.linalg.vector_norm(value - reference).item()
    ref_norm = torch.linalg.vector_norm(reference).item()
    return diff / ref_norm if ref_norm > 0 else diff
