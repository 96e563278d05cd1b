"""Checkpoints epcli did not write: their tensors named as the user's model names them.

A plain state dict, a Hugging Face folder or a DCP directory carries no EP configs;
the user's factory builds the expanded model, which supplies them. What the file
and the model disagree on for mechanical reasons is reconciled here, and said:

* every key prefixed by a wrapper (``module.`` from DDP, ``_orig_mod.`` from
  ``torch.compile``) while the model's keys are not: the prefix is stripped;
* a model of the ``transformers`` library whose ``save_pretrained`` writes some keys under older
  names (ViT's ``vit.encoder.layer.0.attention.attention.query`` for ``vit.layers.0.attention.q_proj``):
  the file's names are mapped back by the library's own renaming, when it only renames;
* a tied weight (one parameter under two names, e.g. a GPT's ``lm_head.weight`` and
  ``wte.weight``) that the file stores once, as safetensors writers do: both names
  read the one stored tensor.

Anything else that differs is left for the caller's strict check, which names the
missing / unexpected keys and wrong shapes; :func:`fit_hint` adds what the file looks
like: a prefix every key shares (a trainer's ``{"model": state_dict}``: ``--state-key model``),
or, when the names differ otherwise (a Hugging Face file with older key names), the file's
closest keys to the first missing ones.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence
from typing import Any, cast

from torch import nn

from epcli.storage.source import TensorSource, renamed
from epcli.text import quote

__all__ = ["WRAPPER_PREFIXES", "collapsed_hint", "fit_hint", "match_keys"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes of wrapped models: ``DistributedDataParallel`` and ``torch.compile``."""


def match_keys(source: TensorSource, model: nn.Module) -> tuple[TensorSource, tuple[str, ...]]:
    """``source`` with its tensors named (and ordered) as ``model``'s state dict, and a note per change made."""
    expected = model.state_dict(keep_vars=True)
    names = {key: key for key in source.tensors}  # name for the model -> name in the file
    notes: list[str] = []
    stripped: list[str] = []
    while prefix := next(
        (
            p
            for p in WRAPPER_PREFIXES
            if names and all(k.startswith(p) for k in names) and not any(k.startswith(p) for k in expected)
        ),
        None,
    ):
        names = {key[len(prefix) :]: old for key, old in names.items()}
        stripped.append(prefix)
    if stripped:
        notes.append(
            f"every key started with {quote(''.join(stripped))} (a DDP / torch.compile-wrapped model's state_dict); "
            "the prefix was stripped"
        )
    if any(key not in names for key in expected):
        saved = _saved_names(model, expected)
        renames = {key: saved[key] for key in names if key in saved and saved[key] != key}
        if renames and sum(saved.get(k, k) in expected for k in names) > sum(k in expected for k in names):
            names = {renames.get(key, key): old for key, old in names.items()}
            notes.append(
                f"{len(renames)} keys are stored under the names transformers' save_pretrained writes for "
                f"{type(model).__name__} (e.g. {quote(next(iter(renames)), 80)}); read under the model's names"
            )
    groups: dict[int, list[str]] = {}
    for key, value in expected.items():
        groups.setdefault(id(value), []).append(key)
    tied: list[str] = []
    for group in groups.values():
        stored = next((key for key in group if key in names), None)
        for key in group:
            if stored is not None and key not in names:
                names[key] = names[stored]
                tied.append(f"{key} = {stored}")
    if tied:
        notes.append(f"tied weights the file stores once are read under both names: {', '.join(tied)}")
    ordered = {key: names[key] for key in expected if key in names}
    ordered.update((key, old) for key, old in names.items() if key not in ordered)  # unexpected: the check names them
    return renamed(source, ordered), tuple(notes)


def _saved_names(model: nn.Module, expected: dict[str, Any]) -> dict[str, str]:
    """How the model's library names its keys on disk: file name -> model name (empty: no renaming known).

    Only a ``transformers`` model can have one; its own save-time renaming (``revert_weight_conversion``, run on
    the model's tensors, which it only relabels) gives the pairs. A conversion that changes tensors (fused or
    split weights) is not a renaming, and gives none.
    """
    if not any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        return {}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(cast(Any, model), dict(expected))
    except Exception:  # a transformers version without it, or a conversion it cannot run: nothing known
        return {}
    owners: dict[int, str] = {}
    for key, value in expected.items():
        owners.setdefault(id(value), key)
    if not isinstance(reverted, dict) or any(id(value) not in owners for value in reverted.values()):
        return {}
    return {str(name): owners[id(value)] for name, value in reverted.items()}


_CLOSEST_SHOWN = 3
"""Missing keys :func:`fit_hint` finds the closest file key for."""


_EP_KEY = re.compile(r"(?:^|\.)(?:layer_dict|residual_dict)\.")
"""A tensor of an expanded EP layer (its chain ``layer_dict.<i>.*`` and learnable skips ``residual_dict.*``)."""


def collapsed_hint(file_keys: Collection[str], form: str) -> str:
    """For a file without epcli metadata none of whose tensors belongs to an expanded EP layer: that it looks
    already collapsed (or never had EP layers), which no ``--model`` makes readable, and where to go instead;
    a clause starting with ``"; "`` (``""`` when some tensor is an EP layer's)."""
    if not file_keys or any(_EP_KEY.search(key) for key in file_keys):
        return ""
    shown = ", ".join(quote(key, 60) for key in list(file_keys)[:3])
    keep = (
        "save_file(tensors, path, metadata=...) with the metadata safe_open(original).metadata() returns"
        if form == "safetensors"
        else "torch.save the dict torch.load returned as it is: it carries the metadata"
    )
    return (
        f"; it looks like an already-collapsed (plain) model saved without epcli's metadata: its tensors ({shown}, "
        "...) are plain layers' weights, none belongs to an expanded EP layer (layer_dict.*), so no --model makes "
        "it readable. Run epcli verify / collapse / inspect on the expanded checkpoint it came from (epcli verify "
        "EXPANDED), and write the collapsed file again with epcli collapse EXPANDED -o FILE; to re-save a collapsed "
        f"file yourself, keep its metadata ({keep})"
    )


def fit_hint(file_keys: Collection[str], model_keys: Collection[str]) -> str:
    """What the file's keys look like beside the model's, as a clause starting with ``"; "`` (``""``: nothing to say).

    A dotted prefix every file key shares whose removal makes keys match is named as the state key to give;
    otherwise, when some model keys are missing, the file's closest key to each of the first few is shown.
    """
    expected = set(model_keys)
    if not file_keys or not expected:
        return ""
    first = next(iter(file_keys))
    parts = first.split(".")[:-1]
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end]) + "."
        if not all(key.startswith(prefix) for key in file_keys):
            break
        stripped = {_unwrapped(key[len(prefix) :]) for key in file_keys}
        if stripped & expected and not all(key.startswith(prefix) for key in expected):
            state_key = quote(prefix[:-1])
            return (
                f"; every key in the file starts with {quote(prefix)} and the model's keys do not: give "
                f"--state-key {state_key} (state_key={state_key}) to read the tensors under it"
            )
    stored = set(file_keys)
    missing = [key for key in model_keys if key not in stored][:_CLOSEST_SHOWN]
    candidates = [(key, _words(key)) for key in file_keys if key not in expected]  # what only the file has
    pairs = [(key, _closest(key, candidates)) for key in missing]
    shown = [f"{quote(key)} ~ {quote(close)}" for key, close in pairs if close is not None]
    if not shown:
        return ""
    return (
        "; the file's closest keys to the first missing ones (model ~ file): " + ", ".join(shown)
        + ": the file names its tensors differently (written by another version of the model's code?)"
    )


def _words(key: str) -> tuple[str, ...]:
    return tuple(re.split(r"[._]", key))


def _closest(key: str, candidates: Sequence[tuple[str, tuple[str, ...]]]) -> str | None:
    """The candidate sharing most of ``key``'s words, two words counting as one when one begins the other (so
    ``q_proj`` and ``query``, ``k_proj`` and ``key`` pair, as renamed attention projections do); ties go to the
    most similar text (difflib). None when no candidate shares half the words."""
    words = _words(key)

    def shared(theirs: tuple[str, ...]) -> int:
        return sum(any(word.startswith(mine) or mine.startswith(word) for word in theirs) for mine in words)

    scores = [shared(theirs) for _, theirs in candidates]
    best = max(scores, default=0)
    if 2 * best < len(words):
        return None
    tied = [candidate for (candidate, _), score in zip(candidates, scores, strict=True) if score == best]
    return max(tied[:_TIES_COMPARED], key=lambda other: difflib.SequenceMatcher(None, key, other).ratio())


_TIES_COMPARED = 64
"""Equally close candidates compared by text, at most (difflib costs the product of the lengths)."""


def _unwrapped(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key
