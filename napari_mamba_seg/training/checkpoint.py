"""Training checkpoints: a model bundle plus the trainer's state, written as a whole folder or not at all.

A checkpoint folder (``<output_dir>/last``, ``<output_dir>/best``) is a model bundle (``model.safetensors`` +
``card.json``, loadable with :func:`napari_mamba_seg.bundles.load_bundle`) with, beside it:

* ``trainer_state.safetensors``: the optimizer's tensors, flattened (``optimizer.state.<param>.<name>``, e.g.
  ``optimizer.state.3.exp_avg``), and, when the bundle holds a moving average of the weights, the trained weights
  (``training_model.<name>``); no pickle anywhere;
* ``trainer_state.json``: everything else (global step, config, LR schedule, optimizer hyper-parameters, grad
  scaler, best metric, early-stopping counter, history). Written last: it marks a complete checkpoint.

Writing (:func:`write_checkpoint`): the new checkpoint is assembled in a hidden staging folder beside the target
(``.<name>.<id>.partial``), flushed to disk, then swapped in with two renames (old target to ``.<name>.<id>.old``,
staging to the target) and the old one removed. A crash or a cancel at any moment leaves either the previous
checkpoint or the new one under the target's name, never a half-written one; a crash between the two renames
leaves the previous checkpoint as ``.<name>.<id>.old``, which :func:`recover_checkpoint` renames back.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_from_bytes
from safetensors.torch import save as safetensors_to_bytes
from torch import nn

from napari_mamba_seg._durable import fsync_directory, write_durably
from napari_mamba_seg.bundles import ModelCard, save_bundle

__all__ = [
    "STATE_FORMAT",
    "STATE_JSON",
    "STATE_TENSORS",
    "optimizer_state_from_files",
    "optimizer_state_to_files",
    "read_trainer_state",
    "recover_checkpoint",
    "write_checkpoint",
]

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = "napari-mamba-seg trainer state"
STATE_FORMAT_VERSION = 1
_OPTIMIZER_PREFIX = "optimizer.state."


def write_checkpoint(
    folder: str | os.PathLike[str],
    model: nn.Module,
    card: ModelCard,
    state: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically, replacing the one there (see the module docstring).

    Args:
        folder: The checkpoint folder, e.g. ``<output_dir>/last``.
        model: A registered architecture (saved with :func:`~napari_mamba_seg.bundles.save_bundle`).
        card: Its card.
        state: JSON-ready trainer state; None = a bundle only (no ``trainer_state.*`` files).
        tensors: Tensors of the trainer state (CPU copies are stored).

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        save_bundle(model, staging, card)
        if state is not None:
            payload = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, **state}
            tensor_bytes = safetensors_to_bytes({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})
            write_durably(staging / STATE_TENSORS, tensor_bytes)
            write_durably(staging / STATE_JSON, (json.dumps(payload, indent=1, allow_nan=True) + "\n").encode())
        fsync_directory(staging)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``, the previous ``folder`` (if any) moved aside first and then removed."""
    parent = folder.parent
    if not folder.exists():
        os.rename(staging, folder)
        fsync_directory(parent)
        return
    old = parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old"
    os.rename(folder, old)
    try:
        os.rename(staging, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    fsync_directory(parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """Clean up after an interrupted :func:`write_checkpoint` of ``folder``; return the folder if it exists then.

    Removes staging folders (``.<name>.*.partial``) left by a crash; when ``folder`` is missing but a previous
    checkpoint was moved aside (``.<name>.*.old``: a crash between the two renames), renames the newest one back.
    """
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return None
    for leftover in parent.glob(f".{folder.name}.*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)
    moved_aside = sorted(parent.glob(f".{folder.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if not folder.exists() and moved_aside:
        os.rename(moved_aside.pop(), folder)
    for leftover in moved_aside:
        shutil.rmtree(leftover, ignore_errors=True)
    return folder if folder.is_dir() else None


def read_trainer_state(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``(state, tensors)`` of a checkpoint folder written by :func:`write_checkpoint`.

    Raises:
        FileNotFoundError: The folder has no trainer state (a plain bundle, or no checkpoint).
        ValueError: The state files are damaged or from a newer release.
    """
    folder = Path(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no trainer state ({STATE_JSON} and {STATE_TENSORS}): it is not a training checkpoint "
            "that can be resumed (a best/ bundle or a bundle from elsewhere?). Resume from <output_dir>/last."
        )
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{json_path} is damaged (not valid JSON): {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{json_path} is not a napari-mamba-seg trainer state")
    version = state.get("format_version")
    if not isinstance(version, int) or version > STATE_FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has trainer state format_version {version!r}; this release reads up to "
            f"{STATE_FORMAT_VERSION}. Upgrade napari-mamba-seg to resume it."
        )
    try:
        tensors = safetensors_from_bytes(tensor_path.read_bytes())
    except Exception as error:
        raise ValueError(f"{tensor_path} is damaged (not a readable safetensors file): {error}") from error
    return state, tensors


def optimizer_state_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimizer's ``state_dict`` split into a JSON-ready dict and flat tensors (no pickle).

    Returns:
        ``(json_part, tensors)``: ``json_part`` holds ``param_groups`` (hyper-parameters, parameter indices) and the
        non-tensor per-parameter values; ``tensors`` maps ``optimizer.state.<index>.<name>`` to the tensors.
    """
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER_PREFIX}{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [
        {key: list(v) if isinstance(v, tuple) else v for key, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    return {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}, tensors


def optimizer_state_from_files(json_part: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer ``state_dict`` rebuilt from :func:`optimizer_state_to_files` output."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(_OPTIMIZER_PREFIX):
            index, _, name = key[len(_OPTIMIZER_PREFIX) :].partition(".")
            state.setdefault(int(index), {})[name] = value
    for index, values in json_part.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [
        {key: tuple(v) if key == "betas" else v for key, v in group.items()} for group in json_part["param_groups"]
    ]
    return {"state": state, "param_groups": groups}
