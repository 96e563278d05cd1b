"""EPLinear: a linear layer trained as a deep chain, collapsed exactly for eval."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from epcli.core import LINEAR, Affine
from epcli.layers.base import EPLayer
from epcli.layers.config import EPLinearConfig

__all__ = ["EPLinear"]


class EPLinear(EPLayer):
    """Expand-and-project linear layer, API-compatible with the original ``EPLinear``.

    ``depth`` Linear layers of hidden width ``int(out_features * width)``, each
    optionally followed by BatchNorm1d, with skips every ``residual_intervals``
    layers (identity, or learnable ``nn.Linear`` projections with
    ``residual_mode="learn"``). ``eval()`` switches to the exact collapsed
    ``F.linear``; ``layer(x, override=True)`` forces the expanded chain. Inputs
    may have any leading dimensions, ``(*, in_features)``.

    ``weight_layout="in_out"`` collapses to transformers' ``Conv1D`` (GPT-2) instead:
    ``weight`` is ``[in, out]`` and ``nf`` / ``nx`` exist, so it replaces one in model
    code and its collapse loads into the original class. ``replaced_bias`` records the
    bias of the layer this one replaced (see :attr:`EPConfig.deploy_changes`).

    Example::

        >>> layer = EPLinear(32, 64, depth=4, residual=True, residual_mode="learn").eval()
        >>> layer.weight.shape
        torch.Size([64, 32])
    """

    _algebra = LINEAR
    _config: EPLinearConfig

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: float = 1,
        depth: int = 2,
        bias: bool = True,
        batch_norm: bool = False,
        residual: bool = False,
        residual_intervals: int | Sequence[int] = 2,
        residual_mode: str = "none",
        collapse_on_eval: bool = True,
        *,
        negative_slope: float = 0.0,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        weight_layout: str = "out_in",
        replaced_bias: bool | None = None,
    ) -> None:
        config = EPLinearConfig(
            in_features=in_features,
            out_features=out_features,
            width=width,
            depth=depth,
            bias=bias,
            batch_norm=batch_norm,
            residual=residual,
            residual_intervals=residual_intervals,  # type: ignore[arg-type]  # normalised by the config
            residual_mode=residual_mode,
            collapse_on_eval=collapse_on_eval,
            negative_slope=negative_slope,
            bn_eps=bn_eps,
            bn_momentum=bn_momentum,
            weight_layout=weight_layout,
            replaced_bias=replaced_bias,
        )
        super().__init__(config)

    @property
    def in_features(self) -> int:
        return self._config.in_features

    @property
    def out_features(self) -> int:
        return self._config.out_features

    @property
    def hidden_features(self) -> int:
        return self._config.hidden_dim

    @property
    def nf(self) -> int:
        """Output features under ``Conv1D``'s name, for model code written against it (``weight_layout="in_out"`` only)."""
        return self._conv1d_size(self._config.out_features)

    @property
    def nx(self) -> int:
        """Input features under ``Conv1D``'s name (``weight_layout="in_out"`` only)."""
        return self._conv1d_size(self._config.in_features)

    def _conv1d_size(self, size: int) -> int:
        """``size``, or AttributeError when the layer stands for an ``nn.Linear`` (``hasattr`` is False, as there)."""
        if self._config.weight_layout != "in_out":
            raise AttributeError
        return size

    def _deployed(self, affine: Affine) -> Affine:
        """``Conv1D`` stores ``[in, out]``: the transpose of the ``[out, in]`` the algebra composes."""
        if self._config.weight_layout == "out_in":
            return affine
        return Affine(affine.weight.t().contiguous(), affine.bias)

    def _make_layer(self, index: int, in_dim: int, out_dim: int) -> nn.Module:
        return nn.Linear(in_dim, out_dim, bias=self._config.bias)

    def _make_norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm1d(channels, eps=self._config.bn_eps, momentum=self._config.bn_momentum)

    def _make_projection(self, destination: int, in_dim: int, out_dim: int) -> nn.Module:
        return nn.Linear(in_dim, out_dim, bias=self._config.bias)

    def expanded_forward(self, x: Tensor) -> Tensor:
        # BatchNorm1d reads dim 1 as features: run the chain on (N, features) and restore the leading dims
        leading = x.shape[:-1]
        out = super().expanded_forward(x.reshape(-1, x.shape[-1]))  # [prod(leading), in] -> [prod(leading), out]
        return out.reshape(*leading, out.shape[-1])

    def _skip_branch(self, source: Tensor, edge: tuple[int, int], destination: Tensor) -> Tensor:
        if self._config.learnable_skips:
            projected: Tensor = self.residual_dict[self.skip_key(edge)](source)
            return projected
        return source

    def _collapsed_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight if self._config.weight_layout == "out_in" else weight.t(), bias)

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"in_features={c.in_features}, out_features={c.out_features}, width={c.width}, depth={c.depth}, "
            f"bias={c.bias}, batch_norm={c.batch_norm}, residual={c.residual}, "
            f"residual_intervals={list(c.residual_intervals)}, residual_mode={c.residual_mode!r}"
            + ("" if c.weight_layout == "out_in" else f", weight_layout={c.weight_layout!r}")
        )
