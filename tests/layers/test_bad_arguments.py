"""Every bad constructor argument raises ValueError (as ConfigError) naming the argument; near misses are accepted."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from epcli import ConfigError, EPConv1d, EPConv2d, EPConv3d, EPLinear


def linear(**kwargs: Any) -> Callable[[], EPLinear]:
    """EPLinear(4, 4, ...) with ``kwargs`` overriding any argument, built when called."""
    return lambda: EPLinear(**{"in_features": 4, "out_features": 4, **kwargs})


def conv(**kwargs: Any) -> Callable[[], EPConv2d]:
    """EPConv2d(2, 2, 3, ...) with ``kwargs`` overriding any argument, built when called."""
    return lambda: EPConv2d(**{"in_channels": 2, "out_channels": 2, "kernel_sizes": 3, **kwargs})


BAD: list[tuple[str, str, Callable[[], object]]] = [
    # (id, word the message must contain, constructor)
    *[(f"depth={v!r}", "depth", linear(depth=v)) for v in (0, -3, "four", 2.5, True)],
    *[(f"width={v!r}", "width", linear(width=v)) for v in (0, -1, math.nan, math.inf, "1")],
    ("width too small: int(8 * 0.1) == 0", "width", linear(out_features=8, width=0.1)),
    *[(f"in_features={v!r}", "in_features", linear(in_features=v)) for v in (0, -1, 4.0)],
    *[(f"out_features={v!r}", "out_features", linear(out_features=v)) for v in (0, -1, 4.0)],
    ("residual_mode='sum'", "residual_mode", linear(residual=True, residual_mode="sum")),
    *[
        (f"residual_intervals={v!r}", "residual_intervals", linear(residual=True, residual_intervals=v))
        for v in (0, -2, [], "2", [1.5])
    ],
    ("identity skip, in != out", "residual_mode", linear(out_features=5, residual=True)),
    ("identity skip, in != out, interval -1", "residual_mode", linear(out_features=5, residual=True,
                                                                      residual_intervals=-1)),
    ("identity skip onto hidden nodes, width 2", "width", linear(width=2, depth=4, residual=True,
                                                                 residual_intervals=2)),
    ("identity skip onto hidden nodes, width 0.5", "width", linear(width=0.5, depth=3, residual=True,
                                                                   residual_intervals=[1, -1])),
    ("bias='yes'", "bias", linear(bias="yes")),
    ("batch_norm=1", "batch_norm", linear(batch_norm=1)),
    ("residual='none'", "residual", linear(residual="none")),
    ("collapse_on_eval=None", "collapse_on_eval", linear(collapse_on_eval=None)),
    ("bn_eps=0", "bn_eps", linear(bn_eps=0)),
    ("bn_momentum=2", "bn_momentum", linear(bn_momentum=2)),
    ("negative_slope=nan", "negative_slope", linear(negative_slope=math.nan)),
    *[(f"conv kernel_sizes={v!r}", "kernel_sizes", conv(kernel_sizes=v)) for v in ([], [0], [-1], "3", 0, 2.5)],
    ("conv depth disagrees with kernel list", "depth", conv(kernel_sizes=[3, 3], depth=3)),
    ("conv depth=0 with int kernel", "depth", conv(depth=0)),
    ("conv even kernel with residual", "kernel_sizes", conv(kernel_sizes=[3, 2, 1], residual=True,
                                                             residual_intervals=1)),
    ("conv padding=-1", "padding", conv(padding=-1)),
    ("conv padding='same'", "padding", conv(padding="same")),
    ("conv stride=0", "stride", conv(stride=0)),
    ("conv in_channels=0", "in_channels", conv(in_channels=0)),
    ("conv out_channels=2.0", "out_channels", conv(out_channels=2.0)),
    ("conv identity skip, in != out", "residual_mode", conv(out_channels=3, residual=True, residual_intervals=-1)),
    ("conv width=0", "width", conv(width=0)),
    ("conv bias='yes'", "bias", conv(bias="yes")),
    ("conv bn_momentum=-0.1", "bn_momentum", conv(bn_momentum=-0.1)),
    # groups, dilation, per-dim sizes and padding modes, on every family
    *[(f"conv groups={v!r}", "groups", conv(groups=v)) for v in (0, -2, 2.0, "2", True)],
    ("conv groups does not divide in_channels", "groups", conv(in_channels=3, out_channels=6, groups=2)),
    ("conv groups does not divide out_channels", "groups", conv(out_channels=3, groups=2)),
    ("conv depthwise, hidden 4 * 1.5 = 6 not divisible by 4", "groups", conv(in_channels=4, out_channels=4,
                                                                           groups=4, width=1.5)),
    *[(f"conv dilation={v!r}", "dilation", conv(dilation=v)) for v in (0, (1, 0), (1, 2, 3), (2,), "2", 1.5)],
    *[(f"conv padding={v!r}", "padding", conv(padding=v)) for v in ((1,), (1, 1, 1), (1, -1), [1.0, 1])],
    *[(f"conv stride={v!r}", "stride", conv(stride=v)) for v in ((1, 0), (2,), (2, 2, 2))],
    *[(f"conv kernel_sizes={v!r}", "kernel_sizes", conv(kernel_sizes=v)) for v in ([(3, 3, 3)], [(3,)], [(3, 0)],
                                                                                  [3, (1, 2.0)])],
    ("conv even rectangular kernel with residual", "kernel_sizes", conv(kernel_sizes=[(3, 2)], residual=True,
                                                                          residual_intervals=1)),
    *[(f"conv padding_mode={v!r}", "padding_mode", conv(padding_mode=v)) for v in ("symmetric", "same", None)],
    ("conv1d padding='same'", "padding", lambda: EPConv1d(2, 2, 3, "same")),
    ("conv1d 2-D kernel", "kernel_sizes", lambda: EPConv1d(2, 2, [(3, 3)])),
    ("conv3d 2-D padding", "padding", lambda: EPConv3d(2, 2, 3, (1, 1))),
    ("conv3d groups", "groups", lambda: EPConv3d(2, 3, 3, groups=2)),
]


@pytest.mark.parametrize(("argument", "build"), [pytest.param(a, b, id=i) for i, a, b in BAD])
def test_bad_argument_raises_value_error_naming_it(argument: str, build: Callable[[], object]) -> None:
    with pytest.raises(ConfigError, match=argument) as raised:
        build()
    assert isinstance(raised.value, ValueError)


GOOD: list[tuple[str, Callable[[], object]]] = [
    ("identity skip in == out, width 2, interval -1", linear(width=2, depth=4, residual=True, residual_intervals=-1)),
    ("identity skip, depth 1 interval 1, width 0.5", linear(width=0.5, depth=1, residual=True, residual_intervals=1)),
    ("width != 1 without residual", linear(out_features=5, width=0.5, residual_intervals=2)),
    ("interval larger than depth adds no skip", linear(out_features=5, depth=2, residual=True, residual_intervals=3)),
    ("bn_momentum=None", linear(batch_norm=True, bn_momentum=None)),
    ("conv even kernel without residual", conv(kernel_sizes=[3, 2, 1])),
    ("conv even int kernel without residual", conv(kernel_sizes=4, depth=3)),
    ("conv padding larger than kernel", conv(padding=7)),
    ("conv depthwise with a channel multiplier", conv(in_channels=4, out_channels=8, groups=4, width=0.5)),
    ("conv depthwise width 2 with identity skip onto the output", conv(in_channels=4, out_channels=4, groups=4,
                                                                       width=2, residual=True, residual_intervals=-1)),
    ("conv even rectangular kernel without residual", conv(kernel_sizes=[(2, 3), (1, 4)], stride=(2, 1))),
    ("conv per-dim tuples as lists", conv(padding=[1, 2], dilation=[2, 1], kernel_sizes=[[3, 5], 1])),
    *[(f"conv padding_mode={m!r}", conv(padding=1, padding_mode=m)) for m in ("circular", "reflect", "replicate")],
    ("conv1d tuple kernel of one", lambda: EPConv1d(2, 2, [(3,), 1], (1,), (2,), dilation=(2,))),
    ("conv3d per-dim", lambda: EPConv3d(2, 2, [(1, 3, 3), 3], (0, 1, 2), groups=2)),
]


@pytest.mark.parametrize("build", [pytest.param(b, id=i) for i, b in GOOD])
def test_near_miss_is_accepted(build: Callable[[], object]) -> None:
    build()


def test_numpy_integers_are_accepted_and_stored_as_python_ints() -> None:
    n = np.int64
    linear_layer = EPLinear(n(4), n(4), depth=n(3), residual=True, residual_intervals=[n(1), n(-1)])
    conv_layer = EPConv2d(n(2), n(3), n(3), n(1), n(2), depth=n(2))
    listed = EPConv2d(n(2), n(3), list(np.array([5, 3, 1])), np.sum([5, 3, 1]) // 2, depth=n(3))
    assert (linear_layer.depth, conv_layer.kernel_sizes, conv_layer.config.stride) == (3, [3, 1], 2)
    assert (listed.kernel_sizes, listed.config.padding) == ([5, 3, 1], 4)
    for layer in (linear_layer, conv_layer, listed):
        json.dumps(layer.config.to_dict())  # raises TypeError on any NumPy scalar left in the config
