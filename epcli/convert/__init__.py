"""Model transforms between the expanded (EP) and the plain form.

``collapse_model`` turns every EP layer into the ``nn.Linear`` / ``nn.Conv2d``
it computes in eval mode; ``overparameterize`` goes the other way for users who
start from a plain architecture. Both return new modules and leave their input
alone. ``collapse_state_dict`` / ``collapse_layer`` do the same on bare tensors
(one layer at a time), so checkpoints can be collapsed without user code.
"""

from __future__ import annotations

from epcli.convert.collapse import (
    CollapseStep,
    collapse_layer,
    collapse_state_dict,
    collapse_steps,
    collapsed_dtype,
    collapsed_keys,
    collapsed_tensors,
    expanded_layer,
    layer_prefix,
    layer_states,
    streamed_collapse,
)
from epcli.convert.model import collapse_model, expanded_eval, plain_model
from epcli.convert.overparameterize import Conversion, ConversionPlan, overparameterize, plan_overparameterize
from epcli.convert.unwrap import unwrap_model

__all__ = [
    "CollapseStep",
    "Conversion",
    "ConversionPlan",
    "collapse_layer",
    "collapse_model",
    "collapse_state_dict",
    "collapse_steps",
    "collapsed_dtype",
    "collapsed_keys",
    "collapsed_tensors",
    "expanded_eval",
    "expanded_layer",
    "layer_prefix",
    "layer_states",
    "overparameterize",
    "plain_model",
    "plan_overparameterize",
    "streamed_collapse",
    "unwrap_model",
]
