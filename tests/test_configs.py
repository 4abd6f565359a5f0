"""config_from_dict: JSON values of the wrong type are named, for every configuration class."""

from __future__ import annotations

import dataclasses
import json

import pytest

from invcoss.configs import ConfigTypeError, check_field_types, config_from_dict
from invcoss.continual.config import ContinualConfig
from invcoss.data.pipeline import get_config
from invcoss.inversion.config import InversionConfig
from invcoss.models import GeneratorConfig, MAEConfig


def _configs():
    return [
        MAEConfig(),
        GeneratorConfig(ndim=3, out_size=(16, 32, 32)),
        InversionConfig.from_profile("quick", "ct"),
        ContinualConfig.from_profile("quick", method="invcoss", order=("ct", "xray")),
        get_config("ct", "quick"),
    ]


@pytest.mark.parametrize("config", _configs(), ids=lambda c: type(c).__name__)
def test_json_round_trip_passes_and_a_string_for_a_number_is_named(config):
    values = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config_from_dict(type(config), values) == config
    name = next(f.name for f in dataclasses.fields(config) if isinstance(values[f.name], int | float)
                and not isinstance(values[f.name], bool))  # fmt: skip
    with pytest.raises(
        ConfigTypeError, match=rf"{type(config).__name__}\.{name} expects .*, got 'abc' \(str\)"
    ):
        config_from_dict(type(config), {**values, name: "abc"})


def test_the_error_is_a_type_and_a_value_error():
    for kind in (TypeError, ValueError):  # callers that read files catch ValueError
        with pytest.raises(kind):
            check_field_types(InversionConfig, {"steps": "abc"}, where="--set")
    check_field_types(InversionConfig, {"alpha_rep": 1, "spacing": [1.0, 1, 2.5], "generator_channels": None})
    with pytest.raises(ConfigTypeError, match=r"--set spacing expects tuple\[float, float, float\] \| None"):
        check_field_types(InversionConfig, {"spacing": [1.0, 1.0]}, where="--set")
    with pytest.raises(ConfigTypeError, match="--set batch_size expects int, got True"):
        check_field_types(InversionConfig, {"batch_size": True}, where="--set")
