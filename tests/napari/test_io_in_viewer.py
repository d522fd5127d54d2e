"""The reader, writer and sample data through a real napari viewer (npe2 manifest, under Xvfb), and a fresh process
showing that reading an image with the plugin imports neither torch nor napari's Qt side."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from nifti_cases import expected_scale, oblique_nifti_affine, write_nifti_case

from napari_mamba_seg.data import LABELS
from napari_mamba_seg.io import read_image

PLUGIN = "napari-mamba-seg"
SAMPLE = "breast_dce_phantom"


@pytest.mark.gui
def test_open_a_dce_nifti_in_the_viewer(make_napari_viewer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NAPARI_MAMBA_SEG_CHANNELS", raising=False)
    path = tmp_path / "dce.nii.gz"
    write_nifti_case(path, phases=3)
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["dce (phase 0)", "dce (phase 1)", "dce (phase 2)"]
    assert list(viewer.layers) == layers
    for layer in layers:
        np.testing.assert_allclose(layer.scale, expected_scale(), rtol=1e-6)
        np.testing.assert_allclose(layer.translate, oblique_nifti_affine()[:3, 3], atol=1e-4)
    # the world extent along z is 6 slices × 2.5 mm: napari shows the volume in mm, not in voxels
    np.testing.assert_allclose(viewer.layers.extent.step, expected_scale(), rtol=1e-6)


@pytest.mark.gui
def test_open_the_sample_and_save_its_labels(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, SAMPLE)
    assert [layer.__class__.__name__ for layer in viewer.layers] == ["Image", "Image", "Image", "Labels"]
    for layer in viewer.layers:
        assert layer.data.shape == (60, 256, 256)
        np.testing.assert_allclose(layer.scale, (2.0, 0.7, 0.7), rtol=1e-12)
    truth = viewer.layers[-1]
    assert list(truth.features["class"]) == [LABELS[value] for value in sorted(LABELS)]
    viewer.layers.selection = {truth}
    [written] = viewer.layers.save(str(tmp_path / "truth.nii.gz"), selected=True, plugin=PLUGIN)
    back = read_image(written)
    np.testing.assert_array_equal(back.array[0], truth.data)
    np.testing.assert_allclose(back.geometry.spacing, (2.0, 0.7, 0.7), rtol=1e-6)


def test_reading_with_the_plugin_imports_neither_torch_nor_napari(tmp_path: Path) -> None:
    """napari calls get_reader on every open; it must stay light (the widgets import torch, not the reader)."""
    path = tmp_path / "dce.nii.gz"
    write_nifti_case(path, phases=2)
    code = f"""
        import json, sys
        from napari_mamba_seg._napari import _layer_data, _reader, _sample_data, _writer
        layers = _reader.get_reader({str(path)!r})({str(path)!r})
        print(json.dumps({{
            "layers": len(layers),
            "imported": [m for m in ("torch", "napari", "qtpy", "napari_mamba_seg.kernels") if m in sys.modules],
        }}))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state == {"layers": 2, "imported": []}
