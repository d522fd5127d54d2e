"""Model bundles: save/load round trip over every test_ architecture, hash and card checks, overwrite refusal,
atomic writes, bundled-bundle lookup, and the pickle-gated research-checkpoint converter."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from napari_mamba_seg import bundles
from napari_mamba_seg.bundles import (
    CARD_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    BundleNotFoundError,
    ModelCard,
    PickleNotAllowedError,
    convert_checkpoint,
    file_sha256,
    import_checkpoint,
    list_bundled,
    load_bundle,
    read_card,
    save_bundle,
)
from napari_mamba_seg.models import config_to_dict, create_model, get_model_entry, list_models

TEST_MODELS = list_models("test_", include_test=True)
# A fast, plain model for the tests that are not about architectures; any test_ model would do.
SMALL = next((name for name in ("test_unet", "test_vm_unet") if name in TEST_MODELS), TEST_MODELS[0])


def _input(name: str, in_channels: int = 2) -> torch.Tensor:
    """A small odd-sized input for ``name``: ``(1, in_channels, 37, 45)`` or ``(1, in_channels, 12, 20, 18)``."""
    spatial = (37, 45) if get_model_entry(name).spatial_dims == 2 else (12, 20, 18)
    return torch.randn(1, in_channels, *spatial, generator=torch.Generator().manual_seed(1))


def _trained_like(name: str, **overrides) -> torch.nn.Module:
    """A model whose parameters and buffers (e.g. BatchNorm statistics) differ from a fresh build, in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, **{"in_channels": 2, "num_classes": 3, **overrides})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.mul_(1 + 0.1 * torch.rand_like(buffer))
    return model.eval()


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A SMALL model saved as a bundle in ``tmp_path / "bundle"``."""
    model = _trained_like(SMALL)
    folder = tmp_path / "bundle"
    save_bundle(model, folder, ModelCard(modality="breast DCE-MRI"))
    return model, folder


def _edit_card(folder: Path, **changes) -> None:
    path = folder / CARD_FILE
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


# ------------------------------------------------------------------------------------------- round trip


def test_there_are_test_models_to_cover() -> None:
    assert TEST_MODELS, "no test_ architecture registered; the round-trip tests below would cover nothing"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_save_then_load_gives_identical_outputs(name: str, tmp_path: Path) -> None:
    model = _trained_like(name)
    x = _input(name)
    expected = _outputs(model, x)
    written = save_bundle(model, tmp_path / name, ModelCard(class_names=["background", "breast", "lesion"]))

    bundle = load_bundle(tmp_path / name)

    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [CARD_FILE, WEIGHTS_FILE]
    assert type(bundle.model) is type(model)
    assert bundle.model.model_name == name
    assert not bundle.model.training
    assert torch.equal(_outputs(bundle.model, x), expected), f"{name}: outputs differ after save -> load"
    assert bundle.card == written == read_card(tmp_path / name)
    assert bundle.card.architecture == name
    assert bundle.card.config == json.loads(json.dumps(config_to_dict(model.config)))
    assert (bundle.card.in_channels, bundle.card.num_classes) == (2, 3)
    assert bundle.card.sha256 == file_sha256(tmp_path / name / WEIGHTS_FILE)
    assert bundle.card.format_version == FORMAT_VERSION
    assert bundle.folder == tmp_path / name


def test_card_json_round_trip() -> None:
    card = ModelCard(
        architecture="vm_unet",
        config={"in_channels": 3, "num_classes": 4, "dims": (96, 192)},
        in_channels=3,
        num_classes=4,
        class_names=("background", "breast", "fibroglandular", "lesion"),
        channel_names=["pre", "phase 1", "phase 2"],
        modality="breast DCE-MRI",
        normalization={"method": "percentile", "lower": 0.5, "upper": 99.5},
        patch_size=(256, 256),
        spacing=(2.0, 0.7, 0.7),
        training_data="120 cases, radiologist-reviewed",
        metrics={"dice_lesion": 0.81},
        parent_bundle="breast_base",
        parent_sha256="0" * 64,
        description="demo",
        license="CC-BY-4.0",
        sha256="f" * 64,
        created="2025-01-01T00:00:00+00:00",
        created_with="napari-mamba-seg 0.1",
    )
    assert ModelCard.from_json(card.to_json()) == card
    assert card.config["dims"] == [96, 192]
    assert card.patch_size == [256, 256]


def test_shared_tensors_are_stored_once_and_restored(tmp_path: Path) -> None:
    """Tied parameters (one tensor under two names) save, and load back into an untied fresh build."""
    model = _trained_like(SMALL)
    by_shape: dict[tuple[int, ...], str] = {}
    pair = None
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 1 and tuple(parameter.shape) in by_shape:
            pair = (by_shape[tuple(parameter.shape)], name)
            break
        by_shape[tuple(parameter.shape)] = name
    assert pair is not None, f"{SMALL} has no two parameters of one shape to tie"
    owner_path, _, attribute = pair[1].rpartition(".")
    setattr(model.get_submodule(owner_path), attribute, model.get_parameter(pair[0]))
    x = _input(SMALL)

    save_bundle(model, tmp_path / "tied", None)
    loaded = load_bundle(tmp_path / "tied").model

    from safetensors import safe_open

    with safe_open(tmp_path / "tied" / WEIGHTS_FILE, framework="pt") as handle:
        stored = set(handle.keys())
    assert pair[0] in stored and pair[1] not in stored
    assert torch.equal(loaded.get_parameter(pair[1]), model.get_parameter(pair[0]))
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_fine_tuned_card_records_the_parent(saved: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    _, folder = saved
    parent = load_bundle(folder)
    card = parent.fine_tuned_card(metrics={"dice": 0.9}, training_data="3 corrected studies")
    child = save_bundle(parent.model, tmp_path / "child", card)
    assert child.parent_bundle == str(folder.resolve())
    assert child.parent_sha256 == parent.card.sha256 == file_sha256(folder / WEIGHTS_FILE)
    assert child.metrics == {"dice": 0.9}
    assert child.modality == "breast DCE-MRI"


def test_card_that_does_not_fit_the_model_is_refused_on_save(tmp_path: Path) -> None:
    model = _trained_like(SMALL)
    with pytest.raises(ValueError, match="class_names has 2 names but the model has 3 classes"):
        save_bundle(model, tmp_path / "a", ModelCard(class_names=["background", "lesion"]))
    wrong_dims = [64] * (5 - get_model_entry(SMALL).spatial_dims)  # 3 values for 2D, 2 for 3D
    with pytest.raises(ValueError, match="patch_size"):
        save_bundle(model, tmp_path / "b", ModelCard(patch_size=wrong_dims))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unregistered_model_is_refused_on_save(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a registered architecture"):
        save_bundle(torch.nn.Conv2d(1, 2, 3), tmp_path / "conv")


# ------------------------------------------------------------------------------------------- overwrite, atomicity


def test_existing_bundle_is_not_overwritten_without_the_flag(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    before = {name: (folder / name).read_bytes() for name in (WEIGHTS_FILE, CARD_FILE)}
    other = _trained_like(SMALL, num_classes=2)

    with pytest.raises(FileExistsError) as info:
        save_bundle(other, folder)
    assert str(folder) in str(info.value) and "overwrite=True" in str(info.value)
    assert {name: (folder / name).read_bytes() for name in before} == before

    save_bundle(other, folder, overwrite=True)
    assert load_bundle(folder).card.num_classes == 2
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, WEIGHTS_FILE]


def test_crash_while_saving_a_new_bundle_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = bundles.write_durably

    def crash_on_card(path: Path, data: bytes) -> None:
        if path.name == CARD_FILE:
            raise OSError("disk full")
        write(path, data)

    monkeypatch.setattr(bundles, "write_durably", crash_on_card)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(_trained_like(SMALL), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_crash_while_overwriting_is_detected_on_load(
    saved: tuple[torch.nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New weights, old card: never a silently wrong model, and no temporary files left behind."""
    _, folder = saved
    write = bundles.write_durably

    def crash_on_card(path: Path, data: bytes) -> None:
        if path.name.startswith(f".{CARD_FILE}"):
            raise OSError("power cut")
        write(path, data)

    monkeypatch.setattr(bundles, "write_durably", crash_on_card)
    with pytest.raises(OSError, match="power cut"):
        save_bundle(_trained_like(SMALL, num_classes=2), folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, WEIGHTS_FILE]
    with pytest.raises(ValueError, match="sha256"):
        load_bundle(folder)


# ------------------------------------------------------------------------------------------- load-time checks


def test_tampered_weights_are_detected(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    weights = folder / WEIGHTS_FILE
    recorded = read_card(folder).sha256
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    with pytest.raises(ValueError, match="sha256") as info:
        load_bundle(folder)
    message = str(info.value)
    assert str(weights) in message
    assert recorded in message and file_sha256(weights) in message


def test_card_whose_config_does_not_match_the_weights(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    config = read_card(folder).config
    _edit_card(folder, config={**config, "num_classes": 5}, num_classes=5)
    with pytest.raises(ValueError, match="do not fit") as info:
        load_bundle(folder)
    assert "shape mismatch" in str(info.value)
    assert re.search(r"file \(3, .*model \(5, ", str(info.value)), str(info.value)


def test_card_fields_that_contradict_the_config(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    _edit_card(folder, in_channels=4)
    with pytest.raises(ValueError, match="in_channels is 4 but the config says 2"):
        load_bundle(folder)


def test_card_with_unknown_config_field(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    _edit_card(folder, config={**read_card(folder).config, "no_such_field": 1})
    with pytest.raises(ValueError, match="no_such_field"):
        load_bundle(folder)


def test_weights_of_another_architecture_list_the_offending_keys(tmp_path: Path) -> None:
    other = next(
        name for name in TEST_MODELS if get_model_entry(name).model_cls is not get_model_entry(SMALL).model_cls
    )
    save_bundle(_trained_like(other), tmp_path / "other")
    target = _trained_like(SMALL)
    save_bundle(target, tmp_path / "small")
    (tmp_path / "small" / WEIGHTS_FILE).write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    _edit_card(tmp_path / "small", sha256=file_sha256(tmp_path / "small" / WEIGHTS_FILE))

    with pytest.raises(ValueError, match="missing key") as info:
        load_bundle(tmp_path / "small")
    first_missing = next(iter(target.state_dict()))
    assert first_missing in str(info.value)


def test_unknown_architecture_lists_the_valid_names(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    _edit_card(folder, architecture="vm_unett")
    with pytest.raises(ValueError, match="Unknown architecture 'vm_unett'") as info:
        load_bundle(folder)
    assert str(folder / CARD_FILE) in str(info.value)
    for name in list_models():
        assert name in str(info.value)


def test_newer_card_format_is_refused(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    _edit_card(folder, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="Upgrade napari-mamba-seg") as info:
        load_bundle(folder)
    assert f"format_version {FORMAT_VERSION + 1}" in str(info.value)


def test_missing_card_is_explained(saved: tuple[torch.nn.Module, Path]) -> None:
    _, folder = saved
    (folder / CARD_FILE).unlink()
    with pytest.raises(ValueError, match=r"card\.json is missing.*interrupted save"):
        load_bundle(folder)


def test_load_by_file_inside_the_bundle(saved: tuple[torch.nn.Module, Path]) -> None:
    model, folder = saved
    x = _input(SMALL)
    assert torch.equal(_outputs(load_bundle(folder / CARD_FILE).model, x), _outputs(model, x))


# ------------------------------------------------------------------------------------------- bundled bundles


def test_bundled_bundles_are_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "weights"
    model = _trained_like(SMALL)
    for name in ("beta", "alpha"):
        save_bundle(model, root / name)
    (root / "__pycache__").mkdir()
    monkeypatch.setattr(bundles, "_bundled_root", lambda: root)
    monkeypatch.chdir(tmp_path)

    assert list_bundled() == ["alpha", "beta"]
    bundle = load_bundle("alpha")
    assert bundle.folder == root / "alpha"
    x = _input(SMALL)
    assert torch.equal(_outputs(bundle.model, x), _outputs(model, x))
    assert bundle.fine_tuned_card().parent_bundle == "alpha"

    with pytest.raises(BundleNotFoundError, match="'gamma'") as info:
        load_bundle("gamma")
    assert "alpha, beta" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_name_without_bundled_bundles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundles, "_bundled_root", lambda: tmp_path / "empty")
    assert list_bundled() == []
    with pytest.raises(BundleNotFoundError, match="ships no bundled weights"):
        load_bundle("breast_v1")


def test_user_bundles_load_by_name_after_bundled_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle saved in the user folder ($NAPARI_MAMBA_SEG_MODELS) loads by name; a bundled name wins a clash."""
    bundled_root, user_root = tmp_path / "weights", tmp_path / "user"
    monkeypatch.setattr(bundles, "_bundled_root", lambda: bundled_root)
    monkeypatch.setenv(bundles.USER_BUNDLES_ENV, str(user_root))
    monkeypatch.chdir(tmp_path)
    assert bundles.user_bundle_root() == user_root
    assert bundles.list_user_bundles() == []  # the folder does not exist yet

    mine, shipped = _trained_like(SMALL), _trained_like(SMALL)
    save_bundle(mine, user_root / "mine")
    save_bundle(mine, user_root / "clash")
    save_bundle(shipped, bundled_root / "clash")
    assert bundles.list_user_bundles() == ["clash", "mine"]
    x = _input(SMALL)
    assert load_bundle("mine").folder == user_root / "mine"
    assert torch.equal(_outputs(load_bundle("mine").model, x), _outputs(mine, x))
    assert load_bundle("clash").folder == bundled_root / "clash"

    with pytest.raises(BundleNotFoundError, match="User bundles") as info:
        load_bundle("nothing")
    assert "clash, mine" in str(info.value)


def test_every_shipped_bundle_loads() -> None:
    """The package's own bundled bundles (none yet) load, hash-checked, under their listed names."""
    names = list_bundled()
    assert names == sorted(names)
    for name in names:
        bundle = load_bundle(name)
        assert bundle.card.architecture in list_models(include_test=True)


# ------------------------------------------------------------------------------------------- research checkpoints


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_pickle_checkpoint_is_refused_without_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "research.pth"
    torch.save(_state_dict(_trained_like(SMALL)), path)

    with pytest.raises(PickleNotAllowedError, match="allow_pickle=True") as info:
        import_checkpoint(path, SMALL, in_channels=2, num_classes=3)
    assert "arbitrary code" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(PickleNotAllowedError, match="arbitrary code") as info:
        load_bundle(path)
    assert "allow_pickle=True" in str(info.value)
    with pytest.raises(PickleNotAllowedError):
        convert_checkpoint(path, SMALL, tmp_path / "bundle", in_channels=2, num_classes=3)
    assert not (tmp_path / "bundle").exists()


def test_pickle_checkpoint_is_imported_with_the_flag(tmp_path: Path) -> None:
    """A DataParallel state dict wrapped like a training checkpoint: unwrapped, prefix stripped, loaded."""
    model = _trained_like(SMALL)
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in _state_dict(model).items()}}
    path = tmp_path / "research.pth"
    torch.save(wrapped, path)

    imported = import_checkpoint(path, SMALL, allow_pickle=True, in_channels=2, num_classes=3)

    assert not imported.training
    x = _input(SMALL)
    assert torch.equal(_outputs(imported, x), _outputs(model, x))


@pytest.mark.parametrize("wrapper", ["model_state_dict", "model", None])
def test_usual_checkpoint_wrappers(wrapper: str | None, tmp_path: Path) -> None:
    model = _trained_like(SMALL)
    state = _state_dict(model)
    path = tmp_path / "research.pt"
    torch.save(state if wrapper is None else {wrapper: state, "optimizer": {"lr": 0.1}}, path)
    imported = import_checkpoint(path, SMALL, allow_pickle=True, in_channels=2, num_classes=3)
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in state.items())


def test_pickle_with_python_objects_is_refused_even_with_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.linear\.Linear") as info:
        import_checkpoint(path, SMALL, allow_pickle=True)
    assert "never unpickles arbitrary objects" in str(info.value)


def test_safetensors_checkpoint_needs_no_flag(tmp_path: Path) -> None:
    model = _trained_like(SMALL)
    path = tmp_path / "research.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in _state_dict(model).items()}, path)
    imported = import_checkpoint(path, SMALL, in_channels=2, num_classes=3)
    x = _input(SMALL)
    assert torch.equal(_outputs(imported, x), _outputs(model, x))


def test_checkpoint_that_does_not_fit_lists_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "research.safetensors"
    save_file({k: v.contiguous() for k, v in _state_dict(_trained_like(SMALL)).items()}, path)
    with pytest.raises(ValueError, match="shape mismatch") as info:
        import_checkpoint(path, SMALL, in_channels=2, num_classes=5)
    assert "Pass the config overrides" in str(info.value)


def test_architecture_key_mapping_is_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The architecture module's ``map_public_checkpoint_keys`` renames the research code's keys."""
    model = _trained_like(SMALL)
    path = tmp_path / "research.safetensors"
    save_file({f"research_net.{k}": v.contiguous() for k, v in _state_dict(model).items()}, path)
    calls = []

    def map_public_checkpoint_keys(state, *, in_channels=None):
        calls.append(in_channels)
        return {k.removeprefix("research_net."): v for k, v in state.items()}

    module = __import__(get_model_entry(SMALL).model_cls.__module__, fromlist=["_"])
    monkeypatch.setattr(module, "map_public_checkpoint_keys", map_public_checkpoint_keys, raising=False)

    imported = import_checkpoint(path, SMALL, in_channels=2, num_classes=3)
    assert calls == [2]
    x = _input(SMALL)
    assert torch.equal(_outputs(imported, x), _outputs(model, x))


def test_public_vm_unet_checkpoint_converts_to_a_bundle(tmp_path: Path) -> None:
    """A checkpoint laid out like the public VM-UNet code's ``latest.pth`` becomes a loadable bundle."""
    model = _trained_like("test_vm_unet")
    public = {"model_state_dict": {f"vmunet.{k}": v for k, v in _state_dict(model).items()}, "epoch": 300}
    path = tmp_path / "latest.pth"
    torch.save(public, path)

    card = convert_checkpoint(
        path, "test_vm_unet", tmp_path / "bundle", allow_pickle=True, in_channels=2, num_classes=3
    )

    assert card.description == f"Imported from latest.pth (sha256 {file_sha256(path)})"
    x = _input("test_vm_unet")
    assert torch.equal(_outputs(load_bundle(tmp_path / "bundle").model, x), _outputs(model, x))
    assert dataclasses.asdict(read_card(tmp_path / "bundle")) == dataclasses.asdict(card)
