"""The limits table's checks and the quoting of file content, unit by unit."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from epcli import CheckpointError, ConfigError, limits
from epcli.checkpoint.metadata import dump_metadata
from epcli.limits import (
    check_config_numbers,
    check_sample_shape,
    check_tensor_shape,
    loads_json,
)
from epcli.text import MAX_QUOTED_CHARS, quote


# ---- quote --------------------------------------------------------------------------------------
def test_quote_bounds_long_strings_and_says_so():
    text = quote("x" * 10**7)
    assert text.startswith("'xxx") and text.endswith("... (10000000 characters)")
    assert len(text) < MAX_QUOTED_CHARS + 40
    assert quote("short") == "'short'"


@pytest.mark.parametrize("raw", ["\x1b[2J\x1b]0;owned\x07", "a\rb\nc", "\u202eevil", "\x9b31m"])
def test_quote_escapes_control_characters(raw: str):
    text = quote(raw)
    assert text.isprintable() and not any(char in text for char in raw if not char.isprintable())


def test_quote_of_a_nested_shared_tuple_is_instant_and_short():
    nest: Any = ()
    for _ in range(60):
        nest = (nest, nest)  # str() would take 2**60 steps
    start = time.perf_counter()
    text = quote(nest)
    assert time.perf_counter() - start < 0.1 and len(text) < 100


def test_quote_of_values_python_cannot_print():
    assert quote(10**5000) == "<a int>"  # beyond sys.get_int_max_str_digits()
    assert quote(2**70) == "1180591620717411303424"


# ---- strict JSON --------------------------------------------------------------------------------
def test_loads_json_matches_json_on_valid_documents():
    document = {"a": [1, 2.5, None, True, {"b": "ü"}], "c": {}}
    assert loads_json(json.dumps(document), "doc") == document


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ('{"a": 1, "a": 2}', "doc repeats the key 'a'"),
        ('{"x": [{"k": 1, "k": 1}]}', "doc repeats the key 'k'"),
        ('{"a": NaN}', "NaN is not a JSON number"),
        ('{"a": -Infinity}', "-Infinity is not a JSON number"),
        ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "doc is not valid JSON"),
        ('{"a": 1', "doc is not valid JSON"),
    ],
)
def test_loads_json_refuses(text: str, phrase: str):
    with pytest.raises(CheckpointError) as info:
        loads_json(text, "doc")
    assert str(info.value).startswith("doc ") and phrase in str(info.value)


def test_loads_json_stops_at_the_object_limit(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(limits, "MAX_JSON_OBJECTS", 10)
    assert len(loads_json(json.dumps([{}] * 10), "doc")) == 10
    with pytest.raises(CheckpointError, match="more than 10 JSON objects"):
        loads_json(json.dumps([{}] * 11), "doc")


# ---- shapes and config numbers --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "phrase"),
    [([0, 2**63], "a size in its shape"), ([2**20, 2**21], "the element count"), ([1] * 17, "the rank is 17")],
)
def test_tensor_shapes(shape: list[int], phrase: str):
    with pytest.raises(CheckpointError, match=phrase):
        check_tensor_shape(shape, "t")
    check_tensor_shape([2**20, 2**20], "t")  # 2**40 elements: at the limit


def test_sample_shapes():
    check_sample_shape([1, 2**13, 2**13], "input_shape")  # 2**26: at the limit
    with pytest.raises(ConfigError, match="has more than 67108864 elements per sample"):
        check_sample_shape([2, 2**13, 2**13], "input_shape")
    with pytest.raises(ConfigError, match="has more than"):
        check_sample_shape([2**70, 2**70, 2**70], "input_shape")


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        ({"dilation": [1, 300]}, "config dilation is 300, over epcli's limit of 256"),  # a field config.py may add
        ({"groups": 2**21}, "config groups is 2097152, over epcli's limit of 1048576"),
        ({"kernel_sizes": [[[[3]]]]}, "lists nested deeper than 3 levels"),
        ({"padding": {"h": 1}}, "must be a number, string or list, got an object"),
        ({"residual_mode": "x" * 2000}, "is a string of 2000 characters"),
        ({"negative_slope": -1e30}, "config negative_slope is -1e+30"),
        ({"residual_intervals": [[1] * 1000] * 5}, "the config holds more than 4096 values"),
        ({f"k{i}": 1 for i in range(300)}, "the number of config keys is 300"),
    ],
)
def test_config_numbers_are_bounded_generically(config: dict[str, Any], phrase: str):
    with pytest.raises(ConfigError) as info:
        check_config_numbers(config, "layer 'x'")
    assert str(info.value).startswith("layer 'x'") and phrase in str(info.value)


def test_config_numbers_within_the_limits_pass():
    check_config_numbers(
        {"depth": 1024, "in_channels": 2**20, "kernel_sizes": [255, 3], "width": 0.5, "bn_eps": 1e-300,
         "bias": True, "bn_momentum": None, "residual_intervals": [-1], "padding": [[1, 1], [2, 2]]},
        "layer 'x'",
    )


def test_metadata_that_json_cannot_hold_names_the_field():
    with pytest.raises(CheckpointError, match=r"metadata\['provenance'\]\['layer_max_abs_error'\]\['1'\] is inf"):
        dump_metadata({"provenance": {"layer_max_abs_error": {"0": 0.5, "1": float("inf")}}})
