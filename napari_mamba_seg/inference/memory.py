"""Memory planning: estimate the peak memory of a prediction before running it, and choose the batch size and
tile that fit a budget.

The model's activation memory is measured once per (model, device, precision) with a small probe forward under
``torch.inference_mode``: forward hooks sum the bytes of the output of every leaf module. Under inference mode
intermediate tensors are freed as soon as they are consumed, so that sum is an upper bound of the activations
alive at any one time (on CUDA the measured allocator peak of the probe is used when it is larger). Divided by the
probe's voxels it gives bytes per input voxel, which scales linearly with ``batch * tile voxels`` (the Mamba
scans and the convolutions are linear in the number of voxels).

One forward of ``batch`` tiles then needs, on the device::

    weights + batch * padded tile voxels * (activation bytes per voxel + input and float32 probability bytes)

and the prediction as a whole adds its host-side arrays (normalised image, blending accumulators, labels), which
the predictor computes per mode. :func:`choose_batch_and_tile` takes the largest batch (at most 32) that fits the
budget, and when even one tile does not fit, halves the tile's largest axis (multiples of the model's size divisor,
at least two divisors) until it does.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from napari_mamba_seg.inference.device import autocast

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_CPU_BATCH_SIZE",
    "ForwardCost",
    "activation_bytes_per_voxel",
    "choose_batch_and_tile",
    "cpu_batch_cap",
    "default_memory_budget_mb",
    "model_weight_bytes",
    "padded_shape",
    "shrink_tile",
]

MAX_BATCH_SIZE = 32
MAX_CPU_BATCH_SIZE = 4
CPU_BATCH_ACTIVATION_MB = 64.0
"""On the CPU an automatic batch holds at most this much estimated activation memory (and at most
:data:`MAX_CPU_BATCH_SIZE` items, at least one): bigger batches run slower there, not faster. Measured on 2 cores,
s per 256² three-channel slice at batch 1 / 2 / 4: U-Net 0.35 / 0.45 / 0.48, U-Mamba-Bot 0.56 / 0.63 / 0.63,
VM-UNet 0.36 / - / 0.50 (each ≥ 250 MB of activations per slice), but UltraLight VM-UNet (14 MB per slice)
0.068 / 0.033 / 0.029."""


def cpu_batch_cap(activation_mb_per_item: float) -> int:
    """The largest automatic CPU batch for items of this estimated activation size (see CPU_BATCH_ACTIVATION_MB)."""
    if activation_mb_per_item <= 0:
        return MAX_CPU_BATCH_SIZE
    return int(max(1, min(MAX_CPU_BATCH_SIZE, CPU_BATCH_ACTIVATION_MB // activation_mb_per_item)))


MB = 1024**2
# probe size per axis (rounded up to a multiple of the size divisor, at least two divisors)
_PROBE_SIDE = {2: 64, 3: 32}

_PROBE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], float]] = weakref.WeakKeyDictionary()


def padded_shape(shape: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...]:
    """The shape a :class:`SegmentationModel` pads an input of ``shape`` to (multiples of ``divisor``)."""
    padded = [math.ceil(s / d) * d for s, d in zip(shape, divisor, strict=True)]
    if padded == list(divisor):
        padded[-1] += divisor[-1]
    return tuple(padded)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def activation_bytes_per_voxel(model: nn.Module, device: torch.device, precision: str) -> float:
    """Activation bytes per input voxel of ``model`` on ``device`` at ``precision``, measured once and cached.

    Args:
        model: A :class:`SegmentationModel` (``spatial_dims``, ``in_channels``, ``size_divisor``), on ``device``,
            in eval mode.
        device: Where it runs.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).

    Returns:
        Bytes per voxel of the (padded) input, for a batch of one.
    """
    key = (str(device), precision)
    cached = _PROBE_CACHE.setdefault(model, {})
    if key not in cached:
        cached[key] = _probe(model, device, precision)
    return cached[key]


def _probe(model: nn.Module, device: torch.device, precision: str) -> float:
    divisor = model.size_divisor
    side = _PROBE_SIDE[model.spatial_dims]
    shape = padded_shape([max(2 * d, math.ceil(side / d) * d) for d in divisor], divisor)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((1, model.in_channels, *shape), generator=generator).to(device)
    leaf_output_bytes = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal leaf_output_bytes
        outputs = output if isinstance(output, tuple | list) else (output,)
        leaf_output_bytes += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    was_training = model.training
    model.eval()  # never update normalisation statistics with the probe
    measured = 0
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            baseline = torch.cuda.memory_allocated(device)
        with torch.inference_mode(), autocast(device, precision):
            model(probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            measured = torch.cuda.max_memory_allocated(device) - baseline
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return max(leaf_output_bytes, measured) / math.prod(shape)


@dataclass(frozen=True)
class ForwardCost:
    """Device memory of one forward pass of a batch of tiles.

    Attributes:
        weight_bytes: Parameters and buffers.
        activation_bytes_per_voxel: From :func:`activation_bytes_per_voxel`.
        in_channels: C (the float32 input batch).
        num_classes: K (float32 logits and softmax, plus the TTA sum when ``tta``).
        size_divisor: The model pads tiles to multiples of this.
        tta: Test-time augmentation keeps a running sum of the flipped predictions.
    """

    weight_bytes: int
    activation_bytes_per_voxel: float
    in_channels: int
    num_classes: int
    size_divisor: tuple[int, ...]
    tta: bool = False

    @property
    def bytes_per_voxel(self) -> float:
        """Device bytes per padded input voxel of one tile: activations, input, logits, softmax (and TTA sum)."""
        probability_copies = 3 if self.tta else 2
        return self.activation_bytes_per_voxel + 4 * (self.in_channels + probability_copies * self.num_classes)

    def device_bytes(self, batch: int, tile: Sequence[int]) -> float:
        """Bytes on the device for a forward of ``batch`` tiles of shape ``tile``."""
        voxels = math.prod(padded_shape(tile, self.size_divisor))
        return self.weight_bytes + batch * voxels * self.bytes_per_voxel


def default_memory_budget_mb(device: torch.device) -> float:
    """The memory a prediction may use on ``device`` when the settings give no budget.

    CUDA: 80 % of the free GPU memory. CPU (and MPS, whose memory is the system's): half the available RAM.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free * 0.8 / MB
    import psutil

    return psutil.virtual_memory().available * 0.5 / MB


def shrink_tile(tile: Sequence[int], divisor: Sequence[int]) -> tuple[int, ...] | None:
    """The next smaller tile: the largest axis that can shrink halved, rounded down to a multiple of the divisor,
    at least two divisors. None when no axis can shrink."""
    tile = list(tile)
    order = sorted(range(len(tile)), key=lambda a: -tile[a])
    for axis in order:
        floor = 2 * divisor[axis]
        smaller = max(floor, (tile[axis] // 2) // divisor[axis] * divisor[axis])
        if smaller < tile[axis]:
            tile[axis] = smaller
            return tuple(tile)
    return None


def choose_batch_and_tile(
    peak_bytes: Callable[[int, tuple[int, ...]], float],
    tile: Sequence[int],
    *,
    budget_mb: float,
    divisor: Sequence[int],
    max_batch: Callable[[tuple[int, ...]], int],
    batch_size: int | None = None,
    allow_shrink: bool = True,
) -> tuple[int, tuple[int, ...], float]:
    """The largest batch (and if needed a smaller tile) whose estimated peak fits the budget.

    Args:
        peak_bytes: ``peak_bytes(batch, tile)``: the estimated peak of the whole prediction.
        tile: The tile to start from.
        budget_mb: The memory budget.
        divisor: The model's size divisor (tiles shrink in multiples of it).
        max_batch: ``max_batch(tile)``: the largest useful batch for a tile (e.g. the number of tiles, capped at
            :data:`MAX_BATCH_SIZE`).
        batch_size: A fixed batch size instead of the largest that fits.
        allow_shrink: Whether the tile may shrink (False for a tile the user chose).

    Returns:
        ``(batch, tile, peak bytes)``.

    Raises:
        MemoryError: Nothing fits; the message gives the estimate, the budget and what to do.
    """
    budget = budget_mb * MB
    current = tuple(int(t) for t in tile)
    while True:
        largest = max(1, max_batch(current))
        candidates = [min(batch_size, largest)] if batch_size else range(largest, 0, -1)
        for batch in candidates:
            peak = peak_bytes(batch, current)
            if peak <= budget:
                return batch, current, peak
        smaller = shrink_tile(current, divisor) if allow_shrink else None
        if smaller is None:
            raise MemoryError(
                f"Prediction needs about {peak / MB:,.0f} MB (batch {batch}, tile {'×'.join(map(str, current))}), "
                f"budget {budget_mb:,.0f} MB; free memory, lower --batch-size or use a smaller tile"
                f"{'' if allow_shrink else ' (--tile-size)'}, or raise the memory budget."
            )
        current = smaller
