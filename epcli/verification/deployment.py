"""The deployment check: a collapsed file loaded strictly into the class the user deploys, judged end to end.

The collapse of an EP layer can differ from the plain layer it replaced (batch-norm on a bias-free layer folds
into a new bias). The user's own class cannot hold that difference; loaders that drop unexpected keys
(``from_pretrained``) then deploy a model that is silently wrong. Building the user's plain model and loading
the artifact with ``strict=True`` is the check that catches it; the layers' configs say which layers changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from epcli.checkpoint.factory import ModelFactory, build_from_factory, factory_name
from epcli.errors import EpcliError, VerificationError
from epcli.layers.config import EPConfig
from epcli.layers.summary import natural_order
from epcli.text import plural, quote

__all__ = ["deploy_changes", "deploy_notes", "deployed_model"]

_SHOWN_KEYS = 5


def deploy_changes(ep_layers: Mapping[str, EPConfig]) -> dict[str, tuple[str, ...]]:
    """Every EP layer whose collapsed form differs from the plain layer it replaced, with how (natural order)."""
    return {path: ep_layers[path].deploy_changes for path in natural_order(ep_layers) if ep_layers[path].deploy_changes}


def deploy_notes(ep_layers: Mapping[str, EPConfig]) -> tuple[str, ...]:
    """One sentence per changed layer, for reports: the original class cannot load what was written for it."""
    return tuple(
        f"layer {path!r} {'; '.join(changes)}: the class it came from cannot load the collapsed file strictly; "
        "check the deployment with epcli verify CKPT ARTIFACT --plain-model module:function"
        for path, changes in deploy_changes(ep_layers).items()
    )


def deployed_model(
    factory: ModelFactory, state: Mapping[str, Tensor], artifact: Path, ep_layers: Mapping[str, EPConfig]
) -> nn.Module:
    """The user's plain model (``factory``) holding ``state`` (the artifact's tensors), loaded strictly, in eval mode.

    A key the class does not have, or lacks, raises :class:`VerificationError` naming the keys and, where the
    configs explain them, the layers whose collapse changed the architecture.
    """
    try:
        model = build_from_factory(factory)
    except EpcliError as e:
        raise type(e)(f"--plain-model: {e}", file=e.file) from e
    own = model.state_dict()
    resized = [
        f"{quote(key, 80)} is {list(tensor.shape)} in {artifact.name}, {list(own[key].shape)} in the class"
        for key, tensor in state.items()
        if key in own and tuple(own[key].shape) != tuple(tensor.shape)
    ]
    if resized:  # load_state_dict would raise a RuntimeError listing them
        raise VerificationError(
            f"{artifact} does not fit --plain-model {factory_name(factory)!r}: {'; '.join(resized[:_SHOWN_KEYS])}"
            f"{f'; ... ({len(resized)} in all)' if len(resized) > _SHOWN_KEYS else ''}; the class is not the one "
            "the expanded model was collapsed into: give --plain-model the function that builds the model you deploy "
            "for this checkpoint, with the same layer sizes",
            file=artifact,
        )
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        parts = [
            f"{what} keys [{', '.join(quote(key, 80) for key in keys[:_SHOWN_KEYS])}"
            f"{f', ... ({len(keys)} in all)' if len(keys) > _SHOWN_KEYS else ''}]"
            for what, keys in (("unexpected", list(unexpected)), ("missing", list(missing)))
            if keys
        ]
        changed = deploy_changes(ep_layers)
        cause = (
            f"; the collapse changed the architecture of {plural(len(changed), 'layer')} "
            f"({', '.join(map(repr, list(changed)[:3]))}"
            f"{', ...' if len(changed) > 3 else ''}: {next(iter(changed.values()))[0]}); overparameterize without "
            "allow_new_bias=True, or deploy a class that has those parameters"
            if changed
            else f"; the class's state_dict keys differ from {artifact.name}'s (unexpected: in the file, not in the "
            "class; missing: in the class, not in the file): give --plain-model the function that builds the model "
            "you deploy, with the module names of the expanded model"
        )
        raise VerificationError(
            f"{artifact} does not load strictly into --plain-model {factory_name(factory)!r}: {'; '.join(parts)}"
            + cause,
            file=artifact,
        )
    return model.eval()
