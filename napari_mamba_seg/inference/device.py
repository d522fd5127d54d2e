"""Devices and precisions: pick the device a prediction runs on, describe the ones this machine has, and the
autocast context of a precision.

Device strings: ``"auto"`` (CUDA, then Apple MPS, then the CPU), ``"cpu"``, ``"cuda"`` (= ``"cuda:0"``),
``"cuda:N"``, ``"mps"``. Precisions: ``"auto"`` (bf16 autocast on CUDA, fp16 where the GPU has no bf16; fp32 on the
CPU and on MPS), ``"fp32"``, ``"bf16"``, ``"fp16"``; a reduced precision runs the model under
``torch.autocast``, the softmax is always computed in float32.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import torch

__all__ = [
    "PRECISIONS",
    "DeviceUnavailableError",
    "autocast",
    "available_devices",
    "resolve_precision",
    "select_device",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")
_GIB = 1024**3


class DeviceUnavailableError(ValueError):
    """The requested device does not exist on this machine; the message lists the ones that do."""


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[tuple[str, str]]:
    """The devices a prediction can run on here, best first, for a device chooser.

    Returns:
        ``(device string, description)`` pairs, e.g. ``("cuda:0", "NVIDIA H100 80GB HBM3 (79.1 GB)")``,
        ``("mps", "Apple GPU (MPS)")``, ``("cpu", "CPU (2 cores)")``. The CPU is always last.
    """
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices.append((f"cuda:{index}", f"{properties.name} ({properties.total_memory / _GIB:.1f} GB)"))
    if _mps_available():
        devices.append(("mps", "Apple GPU (MPS)"))
    cores = _cpu_cores()
    devices.append(("cpu", f"CPU ({cores} core{'s' if cores != 1 else ''})"))
    return devices


def _available_text() -> str:
    return ", ".join(f"{name} ({description})" for name, description in available_devices())


def select_device(requested: str | torch.device = "auto") -> torch.device:
    """The torch device for a device string.

    Args:
        requested: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``.

    Returns:
        The device; ``"auto"`` gives ``cuda:0`` when CUDA works, else ``mps`` when available, else ``cpu``, and
        ``"cuda"`` gives ``cuda:0``.

    Raises:
        ValueError: Not a device string (the message lists the valid forms).
        DeviceUnavailableError: The device does not exist here (the message lists the devices that do).
    """
    text = str(requested).strip().lower()
    match = _DEVICE_PATTERN.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(
            f"Unknown device {str(requested)!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index) or 'mps'. "
            f"Available here: {_available_text()}."
        )
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise DeviceUnavailableError(
                f"Device 'mps' (Apple GPU) is not available on this machine; available: {_available_text()}. "
                "Use --device cpu or --device auto."
            )
        return torch.device("mps")
    return _cuda_device(int(index) if index is not None else 0, text)


def _cuda_device(index: int, text: str) -> torch.device:
    if not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build (no CUDA support)"
        raise DeviceUnavailableError(
            f"Device {text!r} was requested but no CUDA GPU is usable: torch {torch.__version__} is {build}"
            f"{' and sees no GPU' if torch.version.cuda else ''}. Available: {_available_text()}. Use --device cpu "
            "or --device auto, or install a CUDA build of PyTorch on a machine with an NVIDIA GPU."
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceUnavailableError(
            f"Device {text!r} was requested but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}). "
            f"Available: {_available_text()}."
        )
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision (``"fp32"``, ``"bf16"`` or ``"fp16"``) of a precision setting on ``device``.

    ``"auto"`` is bf16 on CUDA (fp16 on GPUs without bf16) and fp32 elsewhere: CPU autocast is slower than
    fp32 on most CPUs, and MPS autocast coverage varies between torch releases.

    Raises:
        ValueError: Unknown precision (the message lists the valid ones).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.autocast`` for a concrete reduced precision on ``device``; nothing for ``"fp32"``.

    Never hold it across a ``yield`` of a generator that other code resumes: autocast state is thread-global.
    """
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision]):
        yield
