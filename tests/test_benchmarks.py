"""benchmarks/models.py on tiny ``test_`` models: parameter count, scan FLOPs counted, table printed.

No wall-clock assertions: latencies are only checked to be positive.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mamba_seg.models import create_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(script: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{Path(script).stem}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models_benchmark():
    return _load_benchmark("models.py")


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_row_of_a_tiny_model(models_benchmark) -> None:
    row = models_benchmark.measure_model("test_unet", size=32, repeats=1)
    model = create_model("test_unet")
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["dims"] == 2
    assert row["latency_shape"] == (32, 32)
    assert row["gmacs"] > 0
    assert row["latency_s"] > 0
    assert row["peak_mib"] > 0


def test_gmacs_include_the_selective_scan(models_benchmark) -> None:
    model = create_model("test_vm_unet")
    with_scan = models_benchmark.count_gmacs(model, (32, 32))
    without_scan = models_benchmark.count_gmacs(model, (32, 32), include_scan=False)
    assert with_scan > without_scan > 0
    # a model without a scan counts the same either way
    unet = create_model("test_unet")
    assert models_benchmark.count_gmacs(unet, (32, 32)) == models_benchmark.count_gmacs(
        unet, (32, 32), include_scan=False
    )


def test_table_prints(models_benchmark, restore_threads, capsys) -> None:
    argv = ["--models", "test_unet", "test_unet_3d", "--size", "32", "--size-3d", "32"]
    rows = models_benchmark.main([*argv, "--latency-size-3d", "16", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert len(rows) == 2
    assert "| architecture | dims | params (M) |" in out
    assert "| test_unet | 2D |" in out
    assert "| test_unet_3d | 3D |" in out
    assert "n/a (3D)" in out
    assert "scan backend" in out
    assert "16×16×16" in out


@pytest.fixture(scope="module")
def training_benchmark():
    return _load_benchmark("training.py")


def test_training_throughput_rows_of_tiny_models(training_benchmark) -> None:
    """benchmarks/training.py times optimizer steps of the real trainer and prints a ratio to the U-Net."""
    import argparse

    args = argparse.Namespace(device="cpu", steps=1, patch_2d=(32, 32), patch_3d=(16, 16, 16), batch_2d=2, batch_3d=1)
    case = training_benchmark.phantom_case((16, 96, 96), spacing=(3.0, 1.8, 1.8))
    assert case.image.shape == (3, 16, 96, 96) and case.labels.max() <= 3
    rows = [training_benchmark.measure(name, case, args) for name in ("test_unet", "test_vm_unet", "test_unet_3d")]
    for row in rows:
        assert row["step_s"] > 0 and row["patches_per_s"] == pytest.approx(row["batch"] / row["step_s"])
    training_benchmark.BASELINES = {2: "test_unet", 3: "test_unet_3d"}
    table = training_benchmark.format_table(rows).splitlines()
    assert table[0].split()[:2] == ["model", "dims"]
    by_model = {line.split()[0]: line.split() for line in table[1:]}
    assert by_model["test_unet"][-1] == "1.00" and by_model["test_unet_3d"][-1] == "1.00"
    assert float(by_model["test_vm_unet"][-1]) > 0


@pytest.fixture(scope="module")
def review_benchmark():
    return _load_benchmark("review_order.py")


def test_review_orders_cover_the_wrong_voxels_as_counted(review_benchmark) -> None:
    rng = np.random.default_rng(0)
    wrong = rng.integers(0, 50, 20)
    expected = wrong + rng.normal(0, 10, 20)  # an imperfect estimate
    foreground = wrong > 25
    orders = review_benchmark.review_orders(expected, wrong, foreground)
    for order in orders.values():
        assert sorted(order) == list(range(20))  # every slice once
    assert orders["most uncertain"] == list(np.argsort(-expected, kind="stable"))
    assert orders["foreground, in order"][: foreground.sum()] == list(np.flatnonzero(foreground))
    for k in (1, 3, 5, 20):
        shares = {name: review_benchmark.coverage(order, wrong, k) for name, order in orders.items()}
        assert shares["oracle"] == max(shares.values())  # no order covers more than the oracle
        assert shares["in order"] == pytest.approx(wrong[:k].sum() / wrong.sum())
    assert review_benchmark.coverage(orders["in order"], wrong, 20) == pytest.approx(1.0)
    assert review_benchmark.coverage([0, 1], np.zeros(3), 1) == 1.0  # nothing wrong: nothing left to find


def test_review_order_counts_wrong_voxels_per_slice_along_the_axis(review_benchmark) -> None:
    mask = np.zeros((3, 4, 5), bool)
    mask[1, :2, :] = True
    mask[:, 0, 0] = True
    np.testing.assert_array_equal(review_benchmark.slice_counts(mask, 0), [1, 10, 1])
    np.testing.assert_array_equal(review_benchmark.slice_counts(mask, 1), [7, 5, 0, 0])
