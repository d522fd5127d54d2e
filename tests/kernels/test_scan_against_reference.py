"""Every fast selective-scan backend against the float64 reference: outputs, last state, gradients.

The grid covers batch {1, 2} x dim {4, 64} x N {1, 8, 16} x L {1, 7, 128, 1000, 4096} x
(B/C grouped or not) in full; the five options (D, z, delta_bias, softplus,
return_last_state) cycle through all 32 combinations along the grid, so every shape is
run once and every option combination several times, on fresh random inputs each.
"""

from __future__ import annotations

import contextlib
import itertools
import zlib

import pytest
import torch

from napari_mamba_seg.kernels import available_backends, selective_scan
from napari_mamba_seg.kernels.testing import SCAN_TENSOR_NAMES, random_scan_inputs, relative_error

OUT_TOLERANCE = 1e-4
GRAD_TOLERANCE = 1e-3

SHAPES = list(itertools.product((1, 2), (4, 64), (1, 8, 16), (1, 7, 128, 1000, 4096), (False, True)))
OPTION_NAMES = ("with_D", "with_z", "with_delta_bias", "delta_softplus", "return_last_state")


def _options(index: int) -> dict[str, bool]:
    # Walk the 32 combinations in a different order than the shapes, so that each
    # combination meets several shapes.
    bits = (index * 7) % 32
    return {name: bool(bits >> i & 1) for i, name in enumerate(OPTION_NAMES)}


GRID = [(*shape, _options(i)) for i, shape in enumerate(SHAPES)]


def _grid_id(case) -> str:
    batch, dim, state, length, grouped, options = case
    flags = "".join(name[0] if not name.startswith("with") else name[5] for name, on in options.items() if on)
    return f"b{batch}-d{dim}-n{state}-l{length}-{'grouped' if grouped else 'shared'}-{flags or 'plain'}"


def _fast_backends_on(device: str) -> list[str]:
    return [name for name, reason in available_backends(device).items() if reason is None and name != "reference"]


CPU_BACKENDS = _fast_backends_on("cpu")


@contextlib.contextmanager
def single_torch_thread():
    """The reference runs thousands of tiny ops, which are faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compare_with_reference(backend: str, inputs: dict, softplus: bool, last_state: bool, seed: int) -> dict:
    """Run ``backend`` and the float64 reference on the same inputs and cotangents.

    Returns:
        Relative error per output (``out``, ``last_state``) and per gradient (``d<name>``).
    """
    fast = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    exact = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    fast_result = selective_scan(**fast, delta_softplus=softplus, return_last_state=last_state, backend=backend)
    with single_torch_thread():
        exact_result = selective_scan(
            **exact, delta_softplus=softplus, return_last_state=last_state, backend="reference"
        )
    if not last_state:
        fast_result, exact_result = (fast_result,), (exact_result,)

    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in exact_result]
    fast_loss = sum((r.double() * c.to(r.device)).sum() for r, c in zip(fast_result, cotangents, strict=True))
    exact_loss = sum((r * c.to(r.device)).sum() for r, c in zip(exact_result, cotangents, strict=True))
    fast_loss.backward()
    with single_torch_thread():
        exact_loss.backward()

    errors = {"out": relative_error(fast_result[0], exact_result[0])}
    if last_state:
        errors["last_state"] = relative_error(fast_result[1], exact_result[1])
    for name in SCAN_TENSOR_NAMES:
        if fast[name] is not None:
            assert fast[name].grad is not None, f"{backend} gave no gradient for {name}"
            assert fast[name].grad.dtype == fast[name].dtype
            errors[f"d{name}"] = relative_error(fast[name].grad, exact[name].grad)
    return errors


def _assert_within_tolerance(errors: dict, out_tol: float = OUT_TOLERANCE, grad_tol: float = GRAD_TOLERANCE) -> None:
    for name, error in errors.items():
        tolerance = grad_tol if name.startswith("d") else out_tol
        assert error <= tolerance, f"{name}: relative error {error:.3g} > {tolerance:g} (all: {errors})"


def _run_grid_case(backend: str, case: tuple, device: str) -> dict:
    """Draw the inputs of one grid case on ``device`` and compare ``backend`` with the reference."""
    batch, dim, state, length, grouped, options = case
    seed = zlib.crc32(_grid_id(case).encode())
    groups = (2 if dim == 4 else 4) if grouped else None
    inputs = random_scan_inputs(
        batch,
        dim,
        state,
        length,
        groups,
        with_D=options["with_D"],
        with_z=options["with_z"],
        with_delta_bias=options["with_delta_bias"],
        device=device,
        seed=seed,
    )
    return compare_with_reference(backend, inputs, options["delta_softplus"], options["return_last_state"], seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_cpu_backends_match_reference(backend, case):
    _assert_within_tolerance(_run_grid_case(backend, case, "cpu"))


def test_grid_covers_every_option_combination():
    combos = {tuple(options.values()) for *_, options in GRID}
    assert len(combos) == 2 ** len(OPTION_NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_trained_model_ranges_long_sequence(backend):
    """A in [-16, -0.01], delta up to 5, L = 16384: finite and within tolerance."""
    inputs = random_scan_inputs(1, 16, 16, 16384, groups=2, trained_ranges=True, seed=7)
    errors = compare_with_reference(backend, inputs, softplus=False, last_state=True, seed=7)
    _assert_within_tolerance(errors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype(backend, dtype):
    """Half inputs are computed in float32: only the final rounding separates them from the reference."""
    inputs = random_scan_inputs(2, 16, 8, 200, groups=2, dtype=dtype, seed=3)
    out = selective_scan(**inputs, delta_softplus=True, backend=backend)
    exact = selective_scan(**{k: v.double() if v is not None else None for k, v in inputs.items()}, delta_softplus=True)
    assert out.dtype == dtype
    rounding = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert relative_error(out, exact) < rounding


CUDA_BACKENDS = ("triton", "mamba_ssm")
# mamba_ssm's own test tolerances (rtol, atol) for half inputs, doubled for gradients.
HALF_TOLERANCES = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


def _skip_unless_runs_on_cuda(backend: str) -> None:
    reason = available_backends("cuda")[backend]
    if reason is not None:
        pytest.skip(f"{backend} cannot run here: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=_grid_id)
def test_cuda_backends_match_reference(backend, case):
    _skip_unless_runs_on_cuda(backend)
    errors = _run_grid_case(backend, case, "cuda")
    if backend == "mamba_ssm" and case[-1]["return_last_state"]:
        # mamba_ssm does not propagate the gradient of the last state
        errors = {k: v for k, v in errors.items() if not k.startswith("d")}
    _assert_within_tolerance(errors)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backends_half_precision(backend, dtype):
    _skip_unless_runs_on_cuda(backend)
    inputs = random_scan_inputs(2, 64, 16, 4096, groups=4, dtype=dtype, device="cuda", seed=23)
    out = selective_scan(**inputs, delta_softplus=True, backend=backend)
    exact = selective_scan(**{k: v.double() if v is not None else None for k, v in inputs.items()}, delta_softplus=True)
    rtol, atol = HALF_TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exact, rtol=rtol, atol=atol)
