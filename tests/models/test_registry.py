"""The registry: names, unknown names, config round trip through JSON-ready dicts."""

from __future__ import annotations

import json

import pytest

from napari_mamba_seg.models import (
    config_from_dict,
    config_to_dict,
    create_model,
    get_model_entry,
    list_models,
)


def test_unknown_architecture_lists_the_valid_names():
    with pytest.raises(ValueError, match="Unknown architecture 'vm_unett'") as info:
        create_model("vm_unett")
    for name in list_models():
        assert name in str(info.value)


def test_unknown_config_field_is_named():
    name = list_models("test_", include_test=True)[0]
    with pytest.raises(ValueError, match="no_such_field"):
        create_model(name, no_such_field=3)


def test_test_variants_are_listed_only_on_request():
    assert not any(n.startswith("test_") for n in list_models())
    assert any(n.startswith("test_") for n in list_models(include_test=True))


@pytest.mark.parametrize("name", list_models(include_test=True))
def test_config_survives_json(name):
    model = create_model(name)
    as_json = json.loads(json.dumps(config_to_dict(model.config)))
    rebuilt = config_from_dict(get_model_entry(name).config_cls, as_json)
    assert rebuilt == model.config
    assert model.model_name == name
