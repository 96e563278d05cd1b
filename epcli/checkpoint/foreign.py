"""Checkpoints epcli did not write: their tensors named as the user's model names them.

A plain state dict, a Hugging Face folder or a DCP directory carries no EP configs;
the user's factory builds the expanded model, which supplies them. What the file
and the model disagree on for mechanical reasons is reconciled here, and said:

* every key prefixed by a wrapper (``module.`` from DDP, ``_orig_mod.`` from
  ``torch.compile``) while the model's keys are not: the prefix is stripped;
* a tied weight (one parameter under two names, e.g. a GPT's ``lm_head.weight`` and
  ``wte.weight``) that the file stores once, as safetensors writers do: both names
  read the one stored tensor.

Anything else that differs is left for the caller's strict check, which names the
missing / unexpected keys and wrong shapes.
"""

from __future__ import annotations

from torch import nn

from epcli.storage.source import TensorSource, renamed
from epcli.text import quote

__all__ = ["WRAPPER_PREFIXES", "match_keys"]

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
