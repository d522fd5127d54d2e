"""Pieces of the fast CPU path that the end-to-end comparison does not isolate."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_mamba_seg.kernels import _cpu_kernels, _simd, selective_scan
from napari_mamba_seg.kernels.testing import random_scan_inputs, relative_error


def _elementwise(scalar_fn):
    """Compile a loop applying one of the kernels' inline scalar functions to an array."""
    import numba

    @numba.njit(fastmath=_simd._FASTMATH, error_model="numpy")
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = scalar_fn(x[i])

    return apply


@pytest.fixture(scope="module")
def vector_exp2():
    return _elementwise(_simd.fast_exp2)


@pytest.fixture(scope="module")
def vector_softplus():
    return _elementwise(_simd._softplus)


def test_fast_exp2_is_accurate_to_float32_rounding(vector_exp2):
    x = np.concatenate([np.linspace(-125, 127, 2_000_003), np.linspace(-1e-3, 1e-3, 20_001)]).astype(np.float32)
    out = np.empty_like(x)
    vector_exp2(x, out)
    exact = np.exp2(x.astype(np.float64))
    assert np.max(np.abs(out / exact - 1)) < 3e-7


def test_fast_exp2_clamps_instead_of_overflowing(vector_exp2):
    x = np.array([-1e30, -300.0, -126.0, 128.0, 1e30], dtype=np.float32)
    out = np.empty_like(x)
    vector_exp2(x, out)
    assert np.all(np.isfinite(out))
    assert out[0] == out[1] == pytest.approx(2.0**-125)
    assert out[-1] == pytest.approx(2.0**127, rel=1e-6)


def test_softplus_matches_log1p_exp(vector_softplus):
    x = np.linspace(-85, 90, 1_000_001).astype(np.float32)  # softplus(-85) = 1.2e-37 is a normal float32
    out = np.empty_like(x)
    vector_softplus(x, out)
    exact = np.logaddexp(0.0, x.astype(np.float64))
    # exp(-|x|) is 2**(-|x| * log2e) with log2e and the product rounded to float32: an
    # error of up to 1e-7 |x| in the exponent, harmless where softplus is used (for
    # |x| > 20 the step size is below 2e-9 or equal to x).
    assert np.all(np.abs(out - exact) / exact < 3e-7 + 1e-7 * np.abs(x))
    # Below that the exact value is subnormal; the kernel's stays at most 2**-125.
    tiny = np.array([-90.0, -200.0, -1e30], dtype=np.float32)
    vector_softplus(tiny, out[:3])
    assert np.all((out[:3] >= 0) & (out[:3] < 3e-38))


def test_results_are_deterministic_and_independent_of_thread_count():
    inputs = random_scan_inputs(2, 40, 16, 300, groups=4, seed=11)
    first = selective_scan(**inputs, delta_softplus=True, backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = selective_scan(**inputs, delta_softplus=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    again = selective_scan(**inputs, delta_softplus=True, backend="cpu")
    assert torch.equal(first, again)
    assert torch.equal(first, single)


def test_last_state_gradient_is_propagated():
    """Unlike mamba_ssm, the gradient of the returned last state reaches the inputs."""
    inputs = random_scan_inputs(1, 8, 4, 50, with_z=False, seed=5)
    u = inputs["u"].requires_grad_(True)
    _, last = selective_scan(**inputs, return_last_state=True, backend="cpu")
    last.sum().backward()
    exact_u = inputs["u"].detach().double().requires_grad_(True)
    exact = {**{k: v.detach().double() if v is not None else None for k, v in inputs.items()}, "u": exact_u}
    _, exact_last = selective_scan(**exact, return_last_state=True, backend="reference")
    exact_last.sum().backward()
    assert u.grad.abs().sum() > 0
    torch.testing.assert_close(u.grad.double(), exact_u.grad, rtol=1e-4, atol=1e-6)


def test_sequences_longer_than_a_tile_match_the_reference_across_tile_edges():
    length = 3 * _cpu_kernels.TILE + 5
    inputs = random_scan_inputs(1, _cpu_kernels.LANES + 3, 4, length, seed=13)
    out = selective_scan(**inputs, backend="cpu")
    exact = selective_scan(**{k: v.double() for k, v in inputs.items()}, backend="reference")
    torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-5)


CONCURRENT_CALLS = """
import threading, torch
from napari_mamba_seg.kernels import selective_scan
from napari_mamba_seg.kernels.testing import random_scan_inputs, relative_error
inputs = random_scan_inputs(2, 64, 16, 2000, 4)
results = [None] * 4
def work(i):
    for _ in range(3):
        results[i] = selective_scan(**inputs, delta_softplus=True, backend="cpu")
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert all(torch.equal(results[0], r) for r in results)
print("ok")
"""


def test_concurrent_calls_from_python_threads_survive_numbas_workqueue_layer():
    """numba's workqueue layer (macOS/Windows without OpenMP) aborts on concurrent launches."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run([sys.executable, "-c", CONCURRENT_CALLS], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.slow
def test_trained_ranges_stay_finite_and_accurate_at_length_65536():
    """A down to -20 with dt up to 5 for 65536 steps: no overflow, no drift from the reference."""
    inputs = random_scan_inputs(1, 4, 4, 65536, trained_ranges=True, with_z=False, seed=17)
    inputs["A"][0, 0] = -20.0
    fast = {k: v.clone().requires_grad_(True) if v is not None else None for k, v in inputs.items()}
    exact = {k: v.double().requires_grad_(True) if v is not None else None for k, v in inputs.items()}
    out, last = selective_scan(**fast, return_last_state=True, backend="cpu")
    exact_out, exact_last = selective_scan(**exact, return_last_state=True, backend="reference")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (exact_out * weights).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert relative_error(out, exact_out) < 1e-4
    assert relative_error(last, exact_last) < 1e-4
    for name in ("u", "delta", "A", "B", "C", "D", "delta_bias"):
        assert torch.isfinite(fast[name].grad).all(), name
        assert relative_error(fast[name].grad, exact[name].grad) < 1e-3, name


def test_inference_without_gradients_gives_the_same_output():
    """Under no_grad the forward skips storing tile states; the output must not change."""
    inputs = random_scan_inputs(1, 20, 8, 3 * _cpu_kernels.TILE + 1, groups=2, seed=19)
    with torch.no_grad():
        inferred = selective_scan(**inputs, delta_softplus=True, backend="cpu")
    trained = selective_scan(
        **{k: v.clone().requires_grad_(True) for k, v in inputs.items()}, delta_softplus=True, backend="cpu"
    )
    assert trained.requires_grad
    assert torch.equal(inferred, trained.detach())


def _vector_elementwise(vector_fn):
    """Compile a loop applying one of the kernels' vector functions to an array, LANES values at a time."""
    import numba

    lanes = _simd.LANES
    vload, vstore = _simd.vload, _simd.vstore

    @numba.njit
    def apply(x, out):
        for i in range(0, x.shape[0], lanes):
            vstore(out, i, vector_fn(vload(x, i)))

    def run(x):
        padded = np.zeros(-(-x.size // lanes) * lanes, dtype=np.float32)
        padded[: x.size] = x
        out = np.empty_like(padded)
        apply(padded, out)
        return out[: x.size]

    return run


def test_vector_exp2_matches_exp2_and_clamps():
    vexp2 = _vector_elementwise(_simd.vexp2)
    x = np.concatenate([np.linspace(-125, 127, 2_000_003), np.linspace(-1e-3, 1e-3, 20_001)]).astype(np.float32)
    out = vexp2(x)
    assert np.max(np.abs(out / np.exp2(x.astype(np.float64)) - 1)) < 3e-7
    extremes = vexp2(np.array([-1e30, -300.0, 128.0, 1e30], dtype=np.float32))
    assert np.all(np.isfinite(extremes))
    assert extremes[0] == extremes[1] == pytest.approx(2.0**-125)
    assert extremes[-1] == pytest.approx(2.0**127, rel=1e-6)


def test_vector_exp2_matches_the_scalar_one(vector_exp2):
    x = np.random.default_rng(0).uniform(-130, 130, 100_000).astype(np.float32)
    scalar = np.empty_like(x)
    vector_exp2(x, scalar)
    np.testing.assert_array_equal(_vector_elementwise(_simd.vexp2)(x), scalar)


def test_vector_softplus_matches_log1p_exp():
    x = np.linspace(-85, 90, 1_000_001).astype(np.float32)
    out = _vector_elementwise(_simd.vsoftplus)(x)
    exact = np.logaddexp(0.0, x.astype(np.float64))
    assert np.all(np.abs(out - exact) / exact < 3e-7 + 1e-7 * np.abs(x))


def test_vector_row_sums_put_row_i_in_lane_i():
    import numba

    vrowsums, vstore = _simd.vrowsums, _simd.vstore

    @numba.njit
    def row_sums(rows, out):
        vstore(out, 0, vrowsums(rows))

    rows = np.random.default_rng(1).normal(size=(_cpu_kernels.LANES, _cpu_kernels.LANES)).astype(np.float32)
    rows[3] *= 1000  # lanes must not mix: a large row shows up in one lane only
    out = np.empty(_cpu_kernels.LANES, dtype=np.float32)
    row_sums(rows, out)
    np.testing.assert_allclose(out, rows.astype(np.float64).sum(1), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("count", [0, 1, 7, 15, 16])
def test_partial_vector_loads_and_stores_touch_only_their_lanes(count):
    import numba

    lanes = _simd.LANES
    vload_first, vstore_first, vstore = _simd.vload_first, _simd.vstore_first, _simd.vstore

    @numba.njit
    def copy_first(src, index, count, loaded, dst):
        v = vload_first(src, index, count)
        vstore(loaded, 0, v)
        vstore_first(dst, index, count, v)

    index = 5
    src = np.arange(1, index + count + 1, dtype=np.float32)  # ends where the lanes end
    loaded = np.full(lanes, -1.0, dtype=np.float32)
    dst = np.full(index + lanes + 3, -1.0, dtype=np.float32)
    copy_first(src, index, count, loaded, dst)
    np.testing.assert_array_equal(loaded, np.concatenate([src[index:], np.zeros(lanes - count, np.float32)]))
    np.testing.assert_array_equal(dst[index : index + count], src[index:])
    assert np.all(np.delete(dst, np.arange(index, index + count)) == -1.0)


def _kernel_inputs(inputs):
    """The float32 numpy arrays ``scan_forward`` reads, from ``random_scan_inputs``."""
    arrays = {name: inputs[name].numpy() for name in ("u", "delta", "delta_bias", "A", "D", "z")}
    arrays["Bt"] = np.ascontiguousarray(inputs["B"].numpy().swapaxes(-1, -2))
    arrays["Ct"] = np.ascontiguousarray(inputs["C"].numpy().swapaxes(-1, -2))
    return arrays


def _kernel_outputs(inputs):
    """NaN-filled arrays for ``scan_forward`` to write (NaNs left over show what it missed)."""
    batch, dim, length = inputs["u"].shape
    state = inputs["A"].shape[1]
    n_tiles = -(-length // _cpu_kernels.TILE)
    return {
        "out": np.full((batch, dim, length), np.nan, dtype=np.float32),
        "tile_states": np.full((batch, dim, n_tiles, state), np.nan, dtype=np.float32),
        "last_state": np.full((batch, dim, state), np.nan, dtype=np.float32),
    }


@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize(
    "length", [3, _cpu_kernels.LANES + 5, _cpu_kernels.SPAN + _cpu_kernels.TILE + 7], ids=["short", "chunk+5", "span+"]
)
def test_both_forward_layouts_agree_on_outputs_and_saved_states(length, has_z):
    """One state vector per channel and one lane per channel: same outputs, tile states and last states."""
    inputs = random_scan_inputs(2, 40, _cpu_kernels.LANES, length, groups=4, trained_ranges=True, seed=23)
    arrays = _kernel_inputs(inputs)
    results = []
    for kernel in (_cpu_kernels.forward_over_states, _cpu_kernels.forward_over_channels):
        outputs = _kernel_outputs(inputs)
        kernel(
            arrays["u"], arrays["delta"], arrays["delta_bias"], arrays["A"], arrays["Bt"], arrays["Ct"],
            arrays["D"], arrays["z"], True, has_z, outputs["out"], outputs["tile_states"], outputs["last_state"], True,
        )  # fmt: skip
        results.append(outputs)
    over_states, over_channels = results
    for name in ("out", "tile_states", "last_state"):
        assert np.all(np.isfinite(over_states[name])), name
        np.testing.assert_allclose(over_states[name], over_channels[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_state_vector_forward_feeds_the_backward_across_span_edges():
    """Gradients through the N = LANES forward's saved tile states, over more than one span."""
    length = _cpu_kernels.SPAN + 2 * _cpu_kernels.TILE + 9
    inputs = random_scan_inputs(1, 18, _cpu_kernels.LANES, length, groups=2, seed=29)
    fast = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    exact = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    out, last = selective_scan(**fast, delta_softplus=True, return_last_state=True, backend="cpu")
    exact_out, exact_last = selective_scan(**exact, delta_softplus=True, return_last_state=True, backend="reference")
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ((out.double() * weights).sum() + last.double().sum()).backward()
    ((exact_out * weights).sum() + exact_last.sum()).backward()
    assert relative_error(out, exact_out) < 1e-4
    assert relative_error(last, exact_last) < 1e-4
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        assert relative_error(fast[name].grad, exact[name].grad) < 1e-3, name


@pytest.mark.parametrize("state", [1, 8, _cpu_kernels.LANES + 4])
def test_state_sizes_off_the_vector_width_match_the_reference(state):
    """With gradients, N < LANES runs padded to LANES states, N > LANES one lane per channel: outputs and gradients."""
    inputs = random_scan_inputs(2, 20, state, 2 * _cpu_kernels.TILE + 3, groups=2, seed=31)
    fast = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    exact = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    out, last = selective_scan(**fast, delta_softplus=True, return_last_state=True, backend="cpu")
    exact_out, exact_last = selective_scan(**exact, delta_softplus=True, return_last_state=True, backend="reference")
    assert last.shape == (2, 20, state) and last.is_contiguous()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    last_weights = torch.randn(last.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ((out.double() * weights).sum() + (last.double() * last_weights).sum()).backward()
    ((exact_out * weights).sum() + (exact_last * last_weights).sum()).backward()
    assert relative_error(out, exact_out) < 1e-4
    assert relative_error(last, exact_last) < 1e-4
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        assert fast[name].grad.shape == inputs[name].shape, name
        assert relative_error(fast[name].grad, exact[name].grad) < 1e-3, name


@pytest.mark.parametrize("state", [1, 4])
def test_small_states_infer_without_padding_and_match_training(state):
    """Inference with few states scans one lane per channel, training a padded state vector: same outputs."""
    inputs = random_scan_inputs(2, 20, state, 2 * _cpu_kernels.TILE + 3, groups=2, seed=37)
    with torch.no_grad():
        inferred, inferred_last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="cpu")
    trained, trained_last = selective_scan(
        **{k: v.clone().requires_grad_(True) for k, v in inputs.items()},
        delta_softplus=True,
        return_last_state=True,
        backend="cpu",
    )
    exact, exact_last = selective_scan(
        **{k: v.double() for k, v in inputs.items()}, delta_softplus=True, return_last_state=True, backend="reference"
    )
    assert relative_error(inferred, exact) < 1e-4 and relative_error(inferred_last, exact_last) < 1e-4
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inferred_last, trained_last.detach(), rtol=1e-5, atol=1e-5)
