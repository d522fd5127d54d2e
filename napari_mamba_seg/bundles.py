"""Model bundles: a folder with the weights (``model.safetensors``) and a card (``card.json``) saying what the model
is, what input it expects and where it comes from; and the catalogue of bundles shipped with the package.

Save and load::

    card = ModelCard(class_names=["background", "breast", "fibroglandular", "lesion"], modality="breast DCE-MRI")
    save_bundle(model, "runs/breast_v1", card)
    bundle = load_bundle("runs/breast_v1")  # or the name of a bundled bundle, see list_bundled()
    logits = bundle.model(x)

Loading rebuilds the architecture through the model registry from the card, checks the weights file against the
sha256 recorded in the card, and reads the weights with safetensors: no code from a bundle is ever run. Pickled
research checkpoints (``.pth``) are read only by :func:`import_checkpoint` / :func:`convert_checkpoint`, and only
when the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import safe_open
from safetensors.torch import save as safetensors_to_bytes
from torch import nn

from napari_mamba_seg import __version__
from napari_mamba_seg._durable import file_sha256, fsync_directory, write_durably
from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.models import config_from_dict, config_to_dict, create_model, get_model_entry
from napari_mamba_seg.models._registry import ModelEntry

__all__ = [
    "CARD_FILE",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleNotFoundError",
    "ModelCard",
    "PickleNotAllowedError",
    "convert_checkpoint",
    "file_sha256",
    "import_checkpoint",
    "list_bundled",
    "list_user_bundles",
    "load_bundle",
    "read_card",
    "save_bundle",
    "user_bundle_root",
]

FORMAT_VERSION = 1
"""Version of the ``card.json`` format this release writes; it reads this version and older ones."""
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"

# Suffixes of pickle-based checkpoint files (torch.save, Lightning, pickle).
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".pkl", ".pickle", ".bin", ".tar")
# Keys under which research code nests the state dict of a checkpoint, most specific first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
# Key prefixes added by torch.nn.DataParallel / DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_ALIASES_METADATA = "napari_mamba_seg.aliases"
_MAX_LISTED = 5


class PickleNotAllowedError(ValueError):
    """A pickle checkpoint was to be read without the caller allowing unpickling (``allow_pickle=True``)."""


class BundleNotFoundError(FileNotFoundError, ValueError):
    """Neither a bundle folder nor the name of a bundled bundle."""


@dataclass
class ModelCard:
    """What a bundle's weights are, what input they expect and where they come from (``card.json``).

    :func:`save_bundle` fills the fields marked *(set on save)* from the model and the written weights file, so a
    card built by hand only needs the descriptive fields.

    Attributes:
        architecture: Registry name, e.g. ``"vm_unet"`` (see ``napari_mamba_seg.models.list_models``). *(set on save)*
        config: The architecture config as a JSON-ready dict (``config_to_dict``). *(set on save)*
        in_channels: Input channels, e.g. 3 for three DCE phases. *(set on save)*
        num_classes: Output classes, background included. *(set on save)*
        class_names: One name per output class, background first; on save, generic names when left empty.
        channel_names: What goes into each input channel, e.g. ``["pre-contrast", "phase 1", "phase 2"]``.
        modality: The expected images, e.g. ``"breast DCE-MRI, fat-suppressed T1"``.
        normalization: How the input is normalised, e.g. ``{"method": "percentile", "lower": 0.5, "upper": 99.5}``.
        patch_size: Training patch (window) size in voxels, model axis order: 2 values (2D) or 3 (3D); or None.
        spacing: Voxel spacing in mm the model was trained at (``(z, y, x)`` for volumes, ``(y, x)`` in-plane for
            2D models); or None.
        resample: Whether the predictor resamples an image to ``spacing`` before predicting (and the result back to
            the image's grid); needs ``spacing``.
        training_data: Data set, number of cases, annotation protocol.
        metrics: Validation metrics, e.g. ``{"dice_lesion": 0.81}``.
        parent_bundle: For a fine-tuned model, the bundle it was fine-tuned from (bundled name or folder).
        parent_sha256: sha256 of the parent's ``model.safetensors``.
        description: Free text.
        license: Licence of the weights, e.g. ``"CC-BY-4.0"``.
        sha256: sha256 of ``model.safetensors``; checked on load. *(set on save)*
        created: When the bundle was saved, ISO 8601 UTC. *(set on save)*
        created_with: ``"napari-mamba-seg <version>"``. *(set on save)*
        format_version: Version of this card format. *(set on save)*
    """

    architecture: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    in_channels: int | None = None
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)
    modality: str = ""
    normalization: dict[str, Any] = field(default_factory=dict)
    patch_size: list[int] | None = None
    spacing: list[float] | None = None
    resample: bool = False
    training_data: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    parent_bundle: str | None = None
    parent_sha256: str | None = None
    description: str = ""
    license: str = ""
    sha256: str = ""
    created: str = ""
    created_with: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """Normalise sequences to lists (so a JSON round trip compares equal) and check the types."""
        self.class_names = [str(name) for name in self.class_names]
        self.channel_names = [str(name) for name in self.channel_names]
        self.patch_size = None if self.patch_size is None else [int(s) for s in self.patch_size]
        self.spacing = None if self.spacing is None else list(checked_spacing(self.spacing, (2, 3)))
        # through JSON once: tuples become lists (a round trip compares equal) and unstorable values fail here
        self.config = _as_json(self.config, "config")
        self.normalization = _as_json(self.normalization, "normalization")
        self.metrics = _as_json(self.metrics, "metrics")
        if self.patch_size is not None and (len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1):
            raise ValueError(f"patch_size must be 2 or 3 positive sizes, got {self.patch_size}")
        if self.resample and self.spacing is None:
            raise ValueError("resample=True needs the spacing to resample to; set spacing or resample=False")

    def summary(self) -> str:
        """One line for listings: architecture, input channels → classes, modality, spacing, fine-tuned-from.

        Example: ``vm_unet | 3 ch (pre, early, late) -> background, breast, lesion | breast DCE-MRI | 2×0.7×0.7 mm``.
        """
        channels = f"{self.in_channels} ch" if self.in_channels is not None else "? ch"
        if self.channel_names:
            channels += f" ({', '.join(self.channel_names)})"
        parts = [self.architecture or "?", f"{channels} -> {', '.join(self.class_names) or '?'}"]
        if self.modality:
            parts.append(self.modality)
        if self.spacing:
            parts.append("×".join(f"{s:g}" for s in self.spacing) + " mm" + (" (resampled)" if self.resample else ""))
        if self.parent_bundle:
            parts.append(f"fine-tuned from {Path(self.parent_bundle).name}")
        return " | ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The card as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The card as the text of ``card.json``."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "card") -> ModelCard:
        """Rebuild a card from :meth:`to_dict` output.

        Args:
            values: The dict, e.g. parsed ``card.json``.
            source: Where it comes from, for error messages.

        Raises:
            ValueError: Missing or newer ``format_version``, unknown fields, or invalid values.
        """
        _check_format_version(values.get("format_version"), source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown card field(s) {unknown}; valid fields: {sorted(known)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: invalid card: {error}") from error

    @classmethod
    def from_json(cls, text: str, *, source: str = "card") -> ModelCard:
        """Rebuild a card from the text of ``card.json``; raises ValueError for invalid JSON or contents."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, source=source)


def _as_json(values: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``values`` as JSON would give it back; ValueError naming the field when it cannot be stored as JSON."""
    try:
        return json.loads(json.dumps(dict(values)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"card.{name} cannot be stored as JSON: {error}") from error


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle.

    Attributes:
        model: The model, rebuilt from the card, weights loaded, in eval mode.
        card: Its card.
        folder: The bundle folder.
    """

    model: nn.Module
    card: ModelCard
    folder: Path

    def fine_tuned_card(self, **changes: Any) -> ModelCard:
        """A card for a model fine-tuned from this bundle: the parent recorded, metrics and hash cleared.

        Args:
            **changes: Card fields to set, e.g. ``metrics={...}``, ``training_data="..."``.

        Returns:
            A new card; pass it to :func:`save_bundle` with the fine-tuned model.
        """
        parent = self.folder.name if _is_bundled_folder(self.folder) else str(self.folder.resolve())
        base = dataclasses.replace(self.card, parent_bundle=parent, parent_sha256=self.card.sha256, metrics={})
        return dataclasses.replace(base, sha256="", created="", created_with="", **changes)


# --------------------------------------------------------------------------------------------- saving


def save_bundle(
    model: nn.Module, folder: str | os.PathLike[str], card: ModelCard | None = None, *, overwrite: bool = False
) -> ModelCard:
    """Save ``model`` as a bundle: ``folder/model.safetensors`` and ``folder/card.json``.

    The model must come from ``create_model`` (or :func:`load_bundle`), so the card can name its registered
    architecture. The files are written atomically: a new bundle appears as a whole folder, and an overwritten one
    has each file replaced in one step (weights first; a crash in between leaves a bundle whose hash check fails
    on load rather than a silently wrong one).

    Args:
        model: A registered architecture (``model.model_name`` and ``model.config``); DataParallel / DDP /
            ``torch.compile`` wrappers are unwrapped. Any device and dtype.
        folder: The bundle folder; created with its parents when missing.
        card: Descriptive fields (class names, modality, ...). The fields marked *(set on save)* in
            :class:`ModelCard` are taken from the model and the written file.
        overwrite: Replace the bundle files already in ``folder``.

    Returns:
        The card as written.

    Raises:
        FileExistsError: ``folder`` already holds bundle files and ``overwrite`` is False.
        ValueError: The model is not a registered architecture, or the card does not fit it.
    """
    model = _unwrap(model)
    entry = _entry_of(model)
    folder = Path(folder)
    _check_target(folder, overwrite)
    card = _card_for(model, entry, card or ModelCard())
    tensors, aliases = _tensors_for_saving(model)
    metadata = {"format": "pt", "architecture": entry.name, _ALIASES_METADATA: json.dumps(aliases)}
    payload = safetensors_to_bytes(tensors, metadata=metadata)
    card = dataclasses.replace(card, sha256=hashlib.sha256(payload).hexdigest())
    _write_bundle_files(folder, payload, card.to_json().encode("utf-8"))
    return card


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _entry_of(model: nn.Module) -> ModelEntry:
    """The registry entry ``model`` was built from; ValueError when it is not a registered architecture."""
    name = getattr(model, "model_name", None)
    try:
        entry = get_model_entry(str(name))
    except ValueError as error:
        raise ValueError(
            f"Cannot save {type(model).__name__} as a bundle: model_name {name!r} is not a registered architecture, "
            f"so the bundle could not be rebuilt. Build the model with napari_mamba_seg.models.create_model. {error}"
        ) from None
    if not isinstance(model, entry.model_cls) or not isinstance(getattr(model, "config", None), entry.config_cls):
        raise ValueError(
            f"Cannot save {type(model).__name__} as a bundle of {name!r}: that architecture builds "
            f"{entry.model_cls.__name__} from a {entry.config_cls.__name__}; build the model with create_model."
        )
    return entry


def _check_target(folder: Path, overwrite: bool) -> None:
    """Refuse to write into a file, or over an existing bundle unless ``overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"Cannot save a bundle to {folder}: it is a file, not a folder.")
    existing = [name for name in (WEIGHTS_FILE, CARD_FILE) if (folder / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a model bundle ({', '.join(existing)}); refusing to overwrite it. "
            "Choose another folder, or pass overwrite=True to replace it."
        )


def _card_for(model: nn.Module, entry: ModelEntry, card: ModelCard) -> ModelCard:
    """``card`` with the fields taken from the model filled in, checked against the model."""
    config = model.config
    num_classes = config.num_classes
    class_names = card.class_names or ["background", *(f"class_{i}" for i in range(1, num_classes))]
    if len(class_names) != num_classes:
        raise ValueError(f"card.class_names has {len(class_names)} names but the model has {num_classes} classes")
    if card.channel_names and len(card.channel_names) != config.in_channels:
        raise ValueError(
            f"card.channel_names has {len(card.channel_names)} names but the model has {config.in_channels} "
            "input channels"
        )
    if card.patch_size is not None and len(card.patch_size) != entry.spatial_dims:
        raise ValueError(
            f"card.patch_size {card.patch_size} must have {entry.spatial_dims} values for a {entry.spatial_dims}D model"
        )
    return dataclasses.replace(
        card,
        architecture=entry.name,
        config=config_to_dict(config),
        in_channels=config.in_channels,
        num_classes=num_classes,
        class_names=class_names,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        created_with=f"napari-mamba-seg {__version__}",
        format_version=FORMAT_VERSION,
    )


def _tensors_for_saving(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as independent CPU tensors, and the shared (tied) entries stored once.

    Returns:
        ``(tensors, aliases)``: ``aliases`` maps each dropped name to the stored name whose tensor it shares.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}; a bundle stores tensors only")
        value = value.detach()
        key = (value.device, value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.to("cpu", copy=True).contiguous()
    return tensors, aliases


def _write_bundle_files(folder: Path, weights: bytes, card: bytes) -> None:
    """Write both files atomically: into a staging folder renamed into place, or each over the old one."""
    files = {WEIGHTS_FILE: weights, CARD_FILE: card}  # weights first: the card (with the hash) commits
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.partial"
        staging.mkdir()
        try:
            for name, data in files.items():
                write_durably(staging / name, data)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(folder.parent)
        return
    for name, data in files.items():
        temporary = folder / f".{name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            write_durably(temporary, data)
            os.replace(temporary, folder / name)
        finally:
            temporary.unlink(missing_ok=True)
    fsync_directory(folder)


# --------------------------------------------------------------------------------------------- loading


def load_bundle(source: str | os.PathLike[str], *, device: str | torch.device | None = None) -> Bundle:
    """Load a bundle: rebuild its architecture from the card, check the weights' hash, load the weights.

    Args:
        source: A bundle folder (or its ``card.json`` / ``model.safetensors``), or the name of a bundled bundle
            (see :func:`list_bundled`).
        device: Move the model there (default: stay on the CPU).

    Returns:
        The :class:`Bundle`; its model is in eval mode.

    Raises:
        BundleNotFoundError: ``source`` is neither a folder nor a bundled name (the message lists the names).
        PickleNotAllowedError: ``source`` is a pickle checkpoint (use :func:`import_checkpoint`).
        ValueError: Unknown architecture (the message lists the valid ones), newer card format, tampered weights
            (hash mismatch), or a card that does not match the weights.
    """
    folder = _resolve_folder(source)
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{folder} is not a complete model bundle: {WEIGHTS_FILE} is missing")
    _verify_sha256(weights, card.sha256)
    model = _build_model(card, folder / CARD_FILE)
    state = _read_safetensors(weights)
    _load_state(model, state, f"{weights} (architecture {card.architecture!r} and config from {CARD_FILE})")
    model.eval()
    if device is not None:
        model.to(device)
    return Bundle(model=model, card=card, folder=folder)


def read_card(source: str | os.PathLike[str]) -> ModelCard:
    """The card of a bundle folder or bundled name, without loading the weights.

    Raises:
        BundleNotFoundError: No such folder or bundled name.
        ValueError: No ``card.json`` there, or it is invalid or from a newer release.
    """
    folder = _resolve_folder(source)
    path = folder / CARD_FILE
    if not path.is_file():
        hint = (
            f" ({WEIGHTS_FILE} is there: an interrupted save, or copied weights?)"
            if (folder / WEIGHTS_FILE).exists()
            else ""
        )
        raise ValueError(f"{folder} is not a model bundle: {CARD_FILE} is missing{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from error
    card = ModelCard.from_json(text, source=str(path))
    if not card.architecture or not re.fullmatch(r"[0-9a-f]{64}", card.sha256):
        raise ValueError(f"{path}: a bundle card needs 'architecture' and the 64-hex-digit 'sha256' of its weights")
    return card


def list_bundled() -> list[str]:
    """Names of the bundles shipped with the package (folders of ``napari_mamba_seg/weights``), sorted."""
    return _bundle_names_in(_bundled_root())


USER_BUNDLES_ENV = "NAPARI_MAMBA_SEG_MODELS"
"""Environment variable naming the folder of the user's own bundles (overrides :func:`user_bundle_root`)."""


def user_bundle_root() -> Path:
    """The folder of the user's own bundles, loadable by name like bundled ones (it may not exist yet).

    ``$NAPARI_MAMBA_SEG_MODELS`` when set, else the platform's user data folder, e.g.
    ``~/.local/share/napari-mamba-seg/models`` on Linux. Fine-tuned models are saved here by default.
    """
    override = os.environ.get(USER_BUNDLES_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return platformdirs.user_data_path("napari-mamba-seg") / "models"


def list_user_bundles() -> list[str]:
    """Names of the bundles in :func:`user_bundle_root` (sub-folders with a ``card.json``), sorted."""
    return _bundle_names_in(user_bundle_root())


def _bundle_names_in(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        path.name
        for path in root.iterdir()
        if path.is_dir() and not path.name.startswith((".", "_")) and (path / CARD_FILE).is_file()
    )


def _bundled_root() -> Path:
    """The package data folder holding the bundled bundles."""
    weights = importlib.import_module("napari_mamba_seg.weights")
    return Path(weights.__file__).resolve().parent


def _is_bundled_folder(folder: Path) -> bool:
    return folder.resolve().parent == _bundled_root()


def _resolve_folder(source: str | os.PathLike[str]) -> Path:
    """The bundle folder ``source`` names: a folder, a file in one, a bundled name, or a user bundle's name."""
    path = Path(source)
    if path.is_file():
        if path.name in (WEIGHTS_FILE, CARD_FILE):
            return path.parent
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise PickleNotAllowedError(_pickle_refusal(path, in_load_bundle=True))
        hint = (
            "; import bare weights with import_checkpoint(path, architecture)" if path.suffix == ".safetensors" else ""
        )
        raise ValueError(f"{path} is a file, not a model bundle (a folder with {WEIGHTS_FILE} and {CARD_FILE}){hint}")
    if path.is_dir():
        return path
    name = os.fspath(source)
    if name and not any(sep in name for sep in ("/", "\\", os.sep)) and not name.startswith("."):
        for root in (_bundled_root(), user_bundle_root()):
            if (root / name / CARD_FILE).is_file():
                return root / name
    names = list_bundled()
    available = ", ".join(names) if names else "none (this installation ships no bundled weights)"
    user_names = list_user_bundles()
    user = ", ".join(user_names) if user_names else "none"
    raise BundleNotFoundError(
        f"No model bundle {name!r}: no such folder, and no bundled or user bundle of that name. "
        f"Bundled bundles: {available}. User bundles (in {user_bundle_root()}): {user}."
    )


def _check_format_version(version: Any, source: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{source}: 'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has card format_version {version}, but napari-mamba-seg {__version__} reads format_version "
            f"{FORMAT_VERSION} and older. Upgrade napari-mamba-seg (pip install -U napari-mamba-seg) to load it."
        )


def _verify_sha256(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"{path} has sha256 {actual}, but {CARD_FILE} records {expected}: the weights file was changed or "
            "damaged after the bundle was saved. Do not use it; restore the bundle from its source."
        )


def _build_model(card: ModelCard, card_path: Path) -> nn.Module:
    """The architecture of ``card``, built from its config (weights not loaded)."""
    try:
        entry = get_model_entry(card.architecture)
    except ValueError as error:
        raise ValueError(f"{card_path}: {error}") from None
    try:
        config = config_from_dict(entry.config_cls, card.config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{card_path}: the config does not fit {card.architecture!r}: {error}") from error
    for name in ("in_channels", "num_classes"):
        stated, built = getattr(card, name), getattr(config, name)
        if stated is not None and stated != built:
            raise ValueError(f"{card_path}: {name} is {stated} but the config says {built}")
    try:
        model = entry.model_cls(config)
    except Exception as error:
        raise ValueError(f"{card_path}: cannot build {card.architecture!r} from its config: {error}") from error
    model.model_name = entry.name
    return model


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with the shared (tied) entries that were stored once restored."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    try:
        aliases = json.loads(metadata.get(_ALIASES_METADATA, "{}"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid {_ALIASES_METADATA!r} metadata: {error}") from error
    for alias, stored in aliases.items():
        if stored in tensors:
            tensors[alias] = tensors[stored]
    return tensors


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load ``state`` into ``model`` strictly; a clear ValueError listing the offending keys when it does not fit."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = [
        _listing(f"{len(keys)} {kind}", keys)
        for kind, keys in (
            ("missing key(s)", missing),
            ("unexpected key(s)", unexpected),
            ("shape mismatch(es)", mismatched),
        )
        if keys
    ]
    if problems:
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(f"{source}: the weights do not fit the {name!r} model: {'; '.join(problems)}.{hint}")
    model.load_state_dict(state, strict=True)


def _listing(label: str, keys: list[str]) -> str:
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"{label}: {', '.join(keys[:_MAX_LISTED])}{more}"


# --------------------------------------------------------------------------------------------- research checkpoints


def import_checkpoint(
    path: str | os.PathLike[str],
    architecture: str,
    *,
    allow_pickle: bool = False,
    mapping_options: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Load a checkpoint of public research code into a registered architecture.

    ``.safetensors`` files are read directly. Pickle files (``.pth``, ``.pt``, ...) are read only with
    ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``, which refuses files holding arbitrary
    Python objects. The usual wrappers are undone: a state dict under ``state_dict`` / ``model_state_dict`` /
    ``model`` / ..., and the ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) key prefixes. When the
    architecture's module defines ``map_public_checkpoint_keys(state_dict, **options)`` and the weights do not fit
    the model as they are (or ``mapping_options`` are given), it maps the research code's parameter names to ours;
    it gets the model's ``in_channels`` when it takes that option.

    Args:
        path: The checkpoint file.
        architecture: Registry name, e.g. ``"vm_unet"``.
        allow_pickle: Allow unpickling; only for files from a source you trust.
        mapping_options: Keyword options for ``map_public_checkpoint_keys``, e.g. ``{"sigmoid_to_softmax": True}``
            for VM-UNet.
        **config_overrides: Config fields that match the checkpoint, e.g. ``num_classes=1``.

    Returns:
        The model with the checkpoint's weights, in eval mode.

    Raises:
        PickleNotAllowedError: A pickle file and ``allow_pickle`` is False.
        ValueError: Unknown architecture, a file that holds more than tensors, or weights that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    state = _strip_wrapper_prefixes(_read_checkpoint(path, allow_pickle))
    model = create_model(architecture, **config_overrides)
    if mapping_options or not _fits(model, state):
        state = _map_public_keys(model, state, dict(mapping_options or {}))
    hint = " Pass the config overrides that match the checkpoint (e.g. num_classes, depths, dims)."
    _load_state(model, state, f"{path} as {architecture!r}", hint=hint)
    return model.eval()


def convert_checkpoint(
    path: str | os.PathLike[str],
    architecture: str,
    folder: str | os.PathLike[str],
    card: ModelCard | None = None,
    *,
    allow_pickle: bool = False,
    overwrite: bool = False,
    mapping_options: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> ModelCard:
    """Import a research checkpoint (:func:`import_checkpoint`) and save it as a bundle (:func:`save_bundle`).

    The card's description, when empty, records the source file's name and sha256.

    Returns:
        The card as written.
    """
    model = import_checkpoint(
        path, architecture, allow_pickle=allow_pickle, mapping_options=mapping_options, **config_overrides
    )
    card = card or ModelCard()
    if not card.description:
        source = Path(path)
        card = dataclasses.replace(card, description=f"Imported from {source.name} (sha256 {file_sha256(source)})")
    return save_bundle(model, folder, card, overwrite=overwrite)


def _pickle_refusal(path: Path, *, in_load_bundle: bool = False) -> str:
    where = (
        "load_bundle reads only bundles (model.safetensors + card.json). To convert it, use "
        "napari_mamba_seg.bundles.convert_checkpoint(path, architecture, folder, allow_pickle=True)"
        if in_load_bundle
        else "To load it anyway, pass allow_pickle=True"
    )
    return (
        f"{path} is a pickle checkpoint: unpickling a file can run arbitrary code hidden in it, so napari-mamba-seg "
        f"does not read one unless you explicitly allow it. {where}, only for a file from a source you trust "
        "(it is then read with torch.load(weights_only=True), which refuses arbitrary Python objects)."
    )


def _read_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict of a safetensors or (if allowed) weights-only pickle checkpoint."""
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    if not allow_pickle:
        raise PickleNotAllowedError(_pickle_refusal(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a Python object of type {found.group(1)}" if found else "data that is not plain tensors"
        raise ValueError(
            f"{path} cannot be read as weights only: it holds {what} (or is damaged), and napari-mamba-seg never "
            "unpickles arbitrary objects. In the research code's environment save just the weights, e.g. "
            "torch.save(model.state_dict(), 'weights.pth') or safetensors.torch.save_file(...), and import that."
        ) from error
    return _find_state_dict(loaded, path)


def _find_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (nested under ``STATE_DICT_KEYS`` at most a few levels)."""
    current = loaded
    for _ in range(4):
        if not isinstance(current, Mapping):
            break
        if current and all(isinstance(value, torch.Tensor) for value in current.values()):
            return dict(current)
        nested = next((current[key] for key in STATE_DICT_KEYS if isinstance(current.get(key), Mapping)), None)
        if nested is None:
            break
        current = nested
    found = f"keys {list(current)[:_MAX_LISTED]}" if isinstance(current, Mapping) else type(current).__name__
    raise ValueError(
        f"{path}: no state dict found: expected a dict of tensors, possibly under one of {list(STATE_DICT_KEYS)}; "
        f"found {found}"
    )


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` / ``_orig_mod.`` prefix that every key carries (repeatedly, for nested wrappers)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                changed = True
    return state


def _fits(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has exactly the model's keys and shapes."""
    expected = model.state_dict()
    return set(state) == set(expected) and all(state[k].shape == v.shape for k, v in expected.items())


def _map_public_keys(
    model: nn.Module, state: dict[str, torch.Tensor], options: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Apply the architecture module's ``map_public_checkpoint_keys`` when it defines one.

    Args:
        model: The target model; its ``in_channels`` is passed when the mapper takes that option.
        state: The checkpoint's tensors.
        options: Keyword options for the mapper.

    Raises:
        ValueError: ``options`` given but the architecture defines no mapper.
    """
    module = importlib.import_module(type(model).__module__)
    mapper = getattr(module, "map_public_checkpoint_keys", None)
    if mapper is None:
        if options:
            raise ValueError(
                f"mapping options {sorted(options)} given, but {module.__name__} defines no map_public_checkpoint_keys"
            )
        return state
    if "in_channels" in inspect.signature(mapper).parameters:
        options.setdefault("in_channels", model.config.in_channels)
    mapped = mapper(state, **options)
    if not isinstance(mapped, Mapping):
        raise TypeError(f"{module.__name__}.map_public_checkpoint_keys returned {type(mapped).__name__}, not a dict")
    return dict(mapped)
