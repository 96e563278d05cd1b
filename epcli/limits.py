"""Every bound on what a file may claim, in one table, checked before anything is allocated.

A checkpoint is untrusted input: a few bytes can claim a trillion-element tensor,
a million modules, a conv padding of 10**9 or a key repeated to confuse parsers.
The readers check each claim against this table as soon as it is parsed (and
before any tensor, module or activation is made), and refuse with a
:class:`~epcli.errors.CheckpointError` / :class:`~epcli.errors.ConfigError`
naming the field and the limit. The limits are far above what real models use
(the largest public checkpoints hold ~10**5 tensors of rank <= 5; EP layers are
tens of layers deep with kernels <= 31) and far below what makes epcli slow:

==========================  =============  ==================================================
limit                       value          bounds
==========================  =============  ==================================================
MAX_HEADER_BYTES            100 MB         safetensors JSON header (the safetensors library's)
MAX_INDEX_BYTES             100 MB         a shard index file
MAX_PICKLE_BYTES            256 MiB        the pickle of a ``.pt`` file, a DCP ``.metadata``
MAX_METADATA_CHARS          16 Mi chars    epcli's metadata JSON (and all ``__metadata__``)
MAX_JSON_OBJECTS            2**19          JSON objects in one header / index / metadata
MAX_TENSORS                 2**18          tensors in a checkpoint (all shards together)
MAX_NAME_CHARS              1024           a tensor name, layer path, module name, string
MAX_RANK                    16             dimensions of a tensor; \\|dim\\| arguments
MAX_TENSOR_ELEMENTS         2**40          elements of one tensor, and each of its sizes
MAX_SLICE_OVERHEAD          1 MiB          bytes of a DCP data slice beyond its tensor's own
                                           (the slice's zip headers and pickle)
MAX_PICKLE_TUPLE            4096           items in one (nested) tuple of those pickles
MAX_TIED_EXPANSION          4              a ``.pt``'s tensor bytes / its storage bytes (tied
                                           weights count twice; stride-0 views are refused)
MAX_ARCHITECTURE_NODES      2**16          modules in an embedded architecture
MAX_NESTING                 64             nesting of Sequentials in an architecture
MAX_EP_LAYERS               2**14          EP layers in one checkpoint
MAX_EP_DEPTH                1024           an EP layer's depth; items of a config list
MAX_FEATURES                2**20          features / channels / any other int of a config
                                           or module argument (hidden size included)
MAX_WINDOW                  256            kernel sizes, padding, stride, dilation
MAX_CONFIG_REAL             2**20          \\|x\\| of a real config number (width, ...)
MAX_SAMPLE_ELEMENTS         2**26          elements of one sample: the input, and every
                                           module's output on it (checked on meta tensors)
MAX_SAMPLES                 2**20          samples of a check (``--samples``, the batch of an
                                           ``--inputs`` file) and ``--batch-size``
MAX_CHECK_BYTES             768 MiB        memory of one check: the samples and expected outputs
                                           it holds, plus a batch x the bytes of every module's
                                           output on one sample; batches are cut to fit, and
                                           what cannot fit is refused. Also bounds the arrays
                                           of an ``--inputs`` file
MAX_TIMEOUT                 86400 s        ``--timeout``: one onnxruntime run of an ONNX file
MAX_ONNX_RUN_BYTES          1.25 GiB       address space of the process that runs an ONNX file,
                                           beyond twice the bytes of the model (and its data)
MIN_OPSET                   7              the oldest ONNX opset exported (the newest is the
                                           installed onnx's)
==========================  =============  ==================================================

Config numbers are checked generically (:func:`check_config_numbers`), by field
name, so fields added to a config later are bounded too.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from typing import Any

from epcli.errors import CheckpointError, ConfigError
from epcli.text import quote

__all__ = [
    "is_int",
    "MAX_ARCHITECTURE_NODES",
    "MAX_CONFIG_REAL",
    "MAX_EP_DEPTH",
    "MAX_EP_LAYERS",
    "MAX_FEATURES",
    "MAX_HEADER_BYTES",
    "MAX_INDEX_BYTES",
    "MAX_JSON_OBJECTS",
    "MAX_METADATA_CHARS",
    "MAX_NAME_CHARS",
    "MAX_NESTING",
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_TUPLE",
    "MAX_RANK",
    "MAX_CHECK_BYTES",
    "MAX_ONNX_RUN_BYTES",
    "MAX_SAMPLES",
    "MAX_SAMPLE_ELEMENTS",
    "MAX_TIMEOUT",
    "MIN_OPSET",
    "MAX_SLICE_OVERHEAD",
    "MAX_TENSORS",
    "MAX_TENSOR_ELEMENTS",
    "MAX_TIED_EXPANSION",
    "MAX_WINDOW",
    "check_config_numbers",
    "check_count",
    "check_name_length",
    "check_sample_shape",
    "check_tensor_shape",
    "loads_json",
]

MAX_HEADER_BYTES = 100_000_000
MAX_INDEX_BYTES = 100_000_000
MAX_PICKLE_BYTES = 256 * 2**20
MAX_METADATA_CHARS = 16 * 2**20
MAX_JSON_OBJECTS = 2**19
MAX_TENSORS = 2**18
MAX_NAME_CHARS = 1024
MAX_RANK = 16
MAX_TENSOR_ELEMENTS = 2**40
MAX_SLICE_OVERHEAD = 2**20
MAX_PICKLE_TUPLE = 4096
MAX_TIED_EXPANSION = 4
MAX_ARCHITECTURE_NODES = 2**16
MAX_NESTING = 64
MAX_EP_LAYERS = 2**14
MAX_EP_DEPTH = 1024
MAX_FEATURES = 2**20
MAX_WINDOW = 256
MAX_CONFIG_REAL = 2**20
MAX_SAMPLE_ELEMENTS = 2**26
MAX_SAMPLES = 2**20
MAX_CHECK_BYTES = 768 * 2**20
MAX_TIMEOUT = 86400.0
MAX_ONNX_RUN_BYTES = 1280 * 2**20
MIN_OPSET = 7

_HINT = "a guard against hostile files; see epcli.limits"
_WINDOW_WORDS = ("kernel", "padding", "stride", "dilation")
_CONFIG_ITEMS = 4 * MAX_EP_DEPTH
"""Numbers and strings in one config dict, all lists included: bounds the cost of any message quoting it."""


def _over(what: str, value: Any, limit: int, unit: str = "") -> str:
    return f"{what} is {quote(value)}{unit}, over epcli's limit of {limit}{unit} ({_HINT})"


def check_count(count: int, limit: int, what: str) -> None:
    """``count`` of something a file holds (tensors, modules, bytes) is at most ``limit``."""
    if count > limit:
        raise CheckpointError(_over(what, count, limit))


def check_name_length(name: str, what: str) -> None:
    if len(name) > MAX_NAME_CHARS:
        raise CheckpointError(f"{what} {quote(name)} is longer than epcli's limit of {MAX_NAME_CHARS} characters")


def is_int(value: Any) -> bool:
    """A Python or NumPy integer that is not a bool (JSON and Python both let True pass as 1; ``np.sum`` of kernel
    sizes is common in user code)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_tensor_shape(shape: Iterable[int], what: str) -> None:
    """Rank, each size and the element count within limits (a zero-size ``[0, 2**63]`` is refused too)."""
    sizes = list(shape)
    if len(sizes) > MAX_RANK:
        raise CheckpointError(_over(f"{what}: the rank", len(sizes), MAX_RANK))
    for size in sizes:
        if size > MAX_TENSOR_ELEMENTS:
            raise CheckpointError(_over(f"{what}: a size in its shape", size, MAX_TENSOR_ELEMENTS))
    count = math.prod(sizes)
    if count > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(_over(f"{what}: the element count", count, MAX_TENSOR_ELEMENTS))


def check_sample_shape(shape: Iterable[int], what: str) -> None:
    """A per-sample shape (an input, or a module's output) has at most :data:`MAX_SAMPLE_ELEMENTS` elements."""
    sizes = list(shape)
    if len(sizes) > MAX_RANK:
        raise ConfigError(_over(f"{what}: the rank", len(sizes), MAX_RANK))
    # checked size by size, so 2**70 never meets math.prod's growing product unbounded
    count = 1
    for size in sizes:
        count *= min(size, MAX_SAMPLE_ELEMENTS + 1)
        if count > MAX_SAMPLE_ELEMENTS:
            raise ConfigError(
                f"{what} {quote(sizes)} has more than {MAX_SAMPLE_ELEMENTS} elements per sample, epcli's limit "
                f"({_HINT})"
            )


def check_config_numbers(data: Any, where: str) -> None:
    """Every number, string and list in a config dict (as read from a file) within the limits, before it is used.

    Generic by field name, so new fields are covered: ``depth`` <= :data:`MAX_EP_DEPTH`;
    fields naming a window (kernel, padding, stride, dilation) <= :data:`MAX_WINDOW`;
    every other int <= :data:`MAX_FEATURES`; reals <= :data:`MAX_CONFIG_REAL` in size;
    strings <= :data:`MAX_NAME_CHARS`; lists nested <= 3 deep. Anything else is left to
    the config's own validation, which then quotes only bounded values.
    """
    if not isinstance(data, dict):
        return
    budget = [_CONFIG_ITEMS]
    if len(data) > 256:
        raise ConfigError(_over(f"{where}: the number of config keys", len(data), 256))
    for key, value in data.items():
        if not isinstance(key, str) or len(key) > 64:
            raise ConfigError(f"{where}: config key {quote(key)} is not a field name")
        bound = (
            MAX_EP_DEPTH if key == "depth"
            else MAX_WINDOW if any(word in key for word in _WINDOW_WORDS)
            else MAX_FEATURES
        )
        _check_value(value, bound, f"{where}: config {key}", 0, budget)


def _check_value(value: Any, bound: int, what: str, level: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{what}: the config holds more than {_CONFIG_ITEMS} values and characters / 16 ({_HINT})")
    if isinstance(value, bool) or value is None:
        return
    if is_int(value):
        if abs(value) > bound:
            raise ConfigError(_over(what, value, bound))
    elif isinstance(value, float):
        if math.isfinite(value) and abs(value) > MAX_CONFIG_REAL:
            raise ConfigError(_over(what, value, MAX_CONFIG_REAL))
    elif isinstance(value, str):
        budget[0] -= len(value) // 16
        if len(value) > MAX_NAME_CHARS:
            raise ConfigError(f"{what} is a string of {len(value)} characters, over epcli's limit of {MAX_NAME_CHARS}")
    elif isinstance(value, (list, tuple)):
        if level >= 3:
            raise ConfigError(f"{what}: lists nested deeper than 3 levels ({_HINT})")
        if len(value) > MAX_EP_DEPTH:
            raise ConfigError(_over(f"{what}: the list length", len(value), MAX_EP_DEPTH))
        for item in value:
            _check_value(item, bound, what, level + 1, budget)
    elif isinstance(value, dict):
        raise ConfigError(f"{what} must be a number, string or list, got an object")


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


class _TooMany(Exception):
    pass


def loads_json(data: str | bytes, what: str, hint: str = "") -> Any:
    """Parse JSON as strictly as the safetensors library: no repeated keys, no NaN / Infinity; bounded objects.

    Parsing stops at the first object beyond :data:`MAX_JSON_OBJECTS`, so a header
    of a million entries costs what the limit allows, not what the file claims.
    Errors are :class:`CheckpointError` starting with ``what``; ``hint`` ends the one for a syntax error.
    """
    count = 0

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > MAX_JSON_OBJECTS:
            raise _TooMany
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            raise _Duplicate(next(k for k, _ in items if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
        return obj

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(data, object_pairs_hook=pairs, parse_constant=constant)
    except _Duplicate as e:
        raise CheckpointError(
            f"{what} repeats the key {quote(e.key)}; JSON readers disagree on which value wins (the safetensors "
            "library refuses it), so epcli refuses it too"
        ) from None
    except _TooMany:
        raise CheckpointError(
            f"{what} holds more than {MAX_JSON_OBJECTS} JSON objects, epcli's limit ({_HINT})"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({str(e)[:200]}){hint}") from e
