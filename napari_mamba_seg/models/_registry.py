"""timm-style model registry: tiny registered constructors that return a config; one factory builds the model.

An architecture module registers each variant with :func:`register_model`::

    @register_model(VMUNet, spatial_dims=2, paper=PaperFigures(params_m=27.43, source="Ruan et al. 2024"))
    def vm_unet(**overrides) -> VMUNetConfig:
        return VMUNetConfig(**overrides)

and :func:`create_model` ``("vm_unet", in_channels=3)`` builds it. Every architecture also registers a tiny
``test_<name>`` variant that the shared contract suite (tests/models/test_model_contract.py) runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModelEntry",
    "PaperFigures",
    "config_from_dict",
    "config_to_dict",
    "create_model",
    "get_model_entry",
    "list_models",
    "register_model",
]


@dataclass(frozen=True)
class PaperFigures:
    """What the paper reports for the full-size model, shown beside our measurements in benchmarks/models.py.

    Attributes:
        source: Short citation, e.g. ``"Ruan et al. 2024 (VM-UNet)"``.
        params_m: Parameters in millions, if the paper states them.
        gflops: GFLOPs at the paper's input size, if stated.
        input_size: The spatial input size the GFLOPs refer to, e.g. ``(256, 256)``.
    """

    source: str
    params_m: float | None = None
    gflops: float | None = None
    input_size: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One registered model variant.

    Attributes:
        name: Registry name, e.g. ``"vm_unet"`` or ``"test_vm_unet"``.
        model_cls: The ``nn.Module`` class; constructed as ``model_cls(config)``.
        make_config: The registered constructor: ``make_config(**overrides) -> config dataclass``.
        spatial_dims: 2 (slices, input ``(b, c, H, W)``) or 3 (volumes, ``(b, c, D, H, W)``).
        paper: The paper's figures for the full-size model (None for test variants).
        description: First line of the constructor's docstring.
    """

    name: str
    model_cls: type[nn.Module]
    make_config: Callable[..., Any]
    spatial_dims: int
    paper: PaperFigures | None
    description: str

    @property
    def config_cls(self) -> type:
        """The config dataclass of this architecture (the type ``make_config`` returns)."""
        return typing.get_type_hints(self.make_config)["return"]

    @property
    def is_test_variant(self) -> bool:
        """Whether this is a tiny ``test_`` variant for fast tests."""
        return self.name.startswith("test_")


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    model_cls: type[nn.Module], *, spatial_dims: int, paper: PaperFigures | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a config constructor under its function name.

    Args:
        model_cls: The module class built from the config.
        spatial_dims: 2 or 3.
        paper: The paper's figures for the full-size variant.

    Returns:
        The decorator; it returns the constructor unchanged.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")

    def decorator(make_config: Callable[..., Any]) -> Callable[..., Any]:
        name = make_config.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = (make_config.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(name, model_cls, make_config, spatial_dims, paper, doc[0] if doc else "")
        return make_config

    return decorator


def list_models(pattern: str | None = None, *, include_test: bool = False) -> list[str]:
    """Names of the registered models, sorted.

    Args:
        pattern: Keep only names containing this substring.
        include_test: Also list the tiny ``test_`` variants.

    Returns:
        Sorted model names.
    """
    names = [n for n, e in _REGISTRY.items() if include_test or not e.is_test_variant]
    if pattern:
        names = [n for n in names if pattern in n]
    return sorted(names)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; raises ValueError listing the valid names when unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown architecture {name!r}.{hint} Valid names: {', '.join(list_models(include_test=True))}."
        ) from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name`` with config fields overridden by ``overrides``.

    Args:
        name: A registry name (see :func:`list_models`).
        **overrides: Config fields, e.g. ``in_channels=3, num_classes=2``.

    Returns:
        The model, in training mode, float32, on the CPU. ``model.model_name`` is ``name`` and ``model.config``
        its config.

    Raises:
        ValueError: Unknown name (the message lists the valid ones) or unknown config field.
    """
    entry = get_model_entry(name)
    valid = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"{name}: unknown config field(s) {unknown}; valid fields: {sorted(valid)}")
    config = entry.make_config(**overrides)
    model = entry.model_cls(config)
    model.model_name = name
    return model


def create_seeded_model(name: str, seed: int, **overrides: Any) -> nn.Module:
    """:func:`create_model` with initial weights drawn from ``torch.manual_seed(seed)``, whatever used torch's global
    RNG before (which is left as it was): the same ``seed`` gives the same weights in any process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **overrides)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(config_cls: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from :func:`config_to_dict` output (lists back to tuples where typed so).

    Raises:
        ValueError: A key is not a field of ``config_cls``.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown config field(s) {unknown}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(config_cls)
    converted = {}
    for key, value in values.items():
        origin = typing.get_origin(hints[key])
        if isinstance(value, list) and (origin is tuple or _union_has_tuple(hints[key])):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        converted[key] = value
    return config_cls(**converted)


def _union_has_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(typing.get_origin(arg) is tuple for arg in typing.get_args(hint))
    return False
