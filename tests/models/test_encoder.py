"""Every registered architecture names its encoder: the input side of the network, closed under data flow (it takes
nothing from the decoder side), never the head; the base class refuses clearly when an architecture names none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_mamba_seg.models import SegmentationModel, create_model, get_model_entry, list_models
from napari_mamba_seg.models._base import ModelConfig

TEST_VARIANTS = [name for name in list_models(include_test=True) if name.startswith("test_")]


def _model_and_input(name: str) -> tuple[SegmentationModel, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_classes=3).eval()
    x = torch.randn(1, 2, *([32] * get_model_entry(name).spatial_dims))
    return model, x


def _modules_with_own_parameters(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def test_every_architecture_is_covered() -> None:
    assert len(TEST_VARIANTS) >= 8  # one tiny variant per architecture family at least


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_the_encoder_is_the_input_side_and_not_the_head(name) -> None:
    model, x = _model_and_input(name)
    encoder = {id(p) for p in model.encoder_parameters()}
    everything = list(model.parameters())
    assert 0 < len(encoder) < len(everything)
    assert encoder <= {id(p) for p in everything}

    called: list[str] = []
    modules = _modules_with_own_parameters(model)
    hooks = [m.register_forward_hook(lambda *_, n=n: called.append(n)) for n, m in modules.items()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()

    def in_encoder(module_name: str) -> bool:
        return all(id(p) in encoder for p in modules[module_name].parameters(recurse=False))

    assert in_encoder(called[0]), f"the first layer on the input ({called[0]}) is not in the encoder"
    last = called[-1]
    assert not in_encoder(last), f"the last layer ({last}) is in the encoder"


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_the_encoder_takes_nothing_from_the_decoder_side(name) -> None:
    """Perturbing every parameter outside the encoder leaves every encoder module's output unchanged."""
    model, x = _model_and_input(name)

    def encoder_outputs() -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []

        def keep(_module, _inputs, output) -> None:
            tensors = output if isinstance(output, list | tuple) else [output]
            outputs.extend(t.clone() for t in tensors if isinstance(t, torch.Tensor))

        inner = [m for module in model.encoder_modules() for m in module.modules()]
        hooks = [m.register_forward_hook(keep) for m in inner]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        return outputs

    before = encoder_outputs()
    encoder = {id(p) for p in model.encoder_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            if id(parameter) not in encoder:
                parameter.add_(torch.randn_like(parameter))
    after = encoder_outputs()
    assert before and len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_architecture_without_a_named_encoder_is_refused_clearly() -> None:
    class Anonymous(SegmentationModel):
        def __init__(self) -> None:
            super().__init__(ModelConfig(), 1)
            self.conv = nn.Conv2d(1, 2, 1)

    with pytest.raises(NotImplementedError, match="does not name its encoder"):
        Anonymous().encoder_parameters()
