"""Behaviour shared by EP layers: structure, expanded forward, cached collapse.

An EP layer trains as a chain ``layer_dict.<i> = Sequential(layer, [BatchNorm])``
with optional skips and, in eval mode, runs the single collapsed layer. The
collapse is a pure function of the parameters and buffers, cached under a
fingerprint of everything PyTorch reports about them: storage, version counter
(bumped by every in-place op, ``load_state_dict`` and ``torch.no_grad()`` edits),
dtype, device, and a count of optimizer steps (fused optimizers skip version
counters). ``train()`` / ``eval()`` also drop the cache. Edits through ``.data``
are invisible to PyTorch itself; after one, call ``eval()`` again.

The cache serves only forwards that need no gradient (``torch.no_grad()``,
inference mode, or no parameter requiring grad). As in PyTorch, ``eval()``
changes batch-norm, not differentiability: with grad enabled the collapse is
computed differentiably (still in float64, cast at the end), so gradients reach
every parameter. Under ``torch.compile`` / ``torch.export`` the same in-graph
collapse runs, since a Python cache keyed on storage pointers cannot be traced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

from epcli.core import Affine, BatchNormFold, ChainLayer, collapse_chain
from epcli.core.affine import LinearAlgebra
from epcli.core.conv import ConvAlgebra
from epcli.layers.config import EPConfig

__all__ = ["EPLayer"]

_STALE_COLLAPSED_KEYS = ("weight", "bias")
"""Buffers the original implementation persisted; derived here, so ignored on load."""


_optimizer_steps = 0


def _count_optimizer_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Fused optimizers update parameters without bumping their version counters; count their steps."""
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _drain(items: list[ChainLayer]) -> Iterator[ChainLayer]:
    """The items in order, each dropped from ``items`` as it is handed out (so nothing else keeps it alive)."""
    items.reverse()
    while items:
        yield items.pop()


def _own(tensor: Tensor | None, detach: bool) -> Tensor | None:
    """``tensor`` itself, or with ``detach`` a tensor sharing its storage but not the parameter."""
    return tensor.detach() if detach and tensor is not None else tensor


def _fold(norm: _BatchNorm, dtype: torch.dtype) -> BatchNormFold:
    """Eval-mode batch-norm as scale/shift, computed in ``dtype`` (float64 but for analysis) with the module's own
    eps; the casts keep autograd history (no copy when a tensor already is in ``dtype``)."""

    def cast(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.to(dtype)

    mean, var = cast(norm.running_mean), cast(norm.running_var)
    if mean is None or var is None:  # never: EP layers build batch-norms that track running stats
        raise RuntimeError("batch-norm without running statistics cannot be folded")
    return BatchNormFold.from_statistics(mean, var, norm.eps, cast(norm.weight), cast(norm.bias))


def _tracing() -> bool:
    """Whether dynamo (``torch.compile``, ``torch.export``) is tracing this call."""
    return torch.compiler.is_compiling()


class _Block(NamedTuple):
    """One link of the chain, typed: the Linear/ConvNd and its optional batch-norm."""

    layer: nn.Linear | _ConvNd
    norm: _BatchNorm | None


class EPLayer(nn.Module):
    """Base of :class:`EPLinear` and :class:`EPConv` (1-D to 3-D); not used directly."""

    _algebra: LinearAlgebra | ConvAlgebra

    def __init__(self, config: EPConfig) -> None:
        super().__init__()
        self._config = config
        self.collapse_on_eval = config.collapse_on_eval
        dims = config.node_dims
        self.layer_dict = nn.ModuleDict(
            {str(j): self._make_block(j, dims[j], dims[j + 1]) for j in range(config.depth)}
        )
        self.residual_dict = nn.ModuleDict(
            {
                self.skip_key(edge): self._make_projection(edge[1], dims[edge[0]], dims[edge[1]])
                for edge in config.skips
            }
            if config.learnable_skips
            else {}
        )
        self._incoming: dict[int, list[int]] = {}
        for source, destination in config.skips:
            self._incoming.setdefault(destination, []).append(source)
        self._cache: tuple[tuple[Any, ...], Tensor, Tensor | None] | None = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: EPConfig) -> EPLayer:
        """A freshly initialised layer built from ``config`` (e.g. one read from a checkpoint)."""
        return cls(**config.to_dict())

    # ---- structure --------------------------------------------------------------
    @staticmethod
    def skip_key(edge: tuple[int, int]) -> str:
        """Key of a learnable skip in ``residual_dict``: ``"<source>_<destination>"``."""
        return f"{edge[0]}_{edge[1]}"

    def _make_layer(self, index: int, in_dim: int, out_dim: int) -> nn.Module:
        raise NotImplementedError

    def _make_norm(self, channels: int) -> nn.Module:
        raise NotImplementedError

    def _make_projection(self, destination: int, in_dim: int, out_dim: int) -> nn.Module:
        raise NotImplementedError

    def _make_block(self, index: int, in_dim: int, out_dim: int) -> nn.Sequential:
        block = [self._make_layer(index, in_dim, out_dim)]
        if self._config.batch_norm:
            block.append(self._make_norm(out_dim))
        return nn.Sequential(*block)

    def _blocks(self) -> list[_Block]:
        blocks = []
        for block in self.layer_dict.values():
            modules = list(block.children())
            blocks.append(_Block(modules[0], modules[1] if len(modules) > 1 else None))  # type: ignore[arg-type]
        return blocks

    def _projections(self) -> dict[str, nn.Linear | _ConvNd]:
        """Learnable skips by key (empty for identity skips)."""
        return dict(self.residual_dict.items())  # type: ignore[arg-type]

    @property
    def config(self) -> EPConfig:
        """The frozen configuration this layer was built from (with the current ``collapse_on_eval``)."""
        if self._config.collapse_on_eval == self.collapse_on_eval:
            return self._config
        return type(self._config).from_dict({**self._config.to_dict(), "collapse_on_eval": self.collapse_on_eval})

    @property
    def depth(self) -> int:
        return self._config.depth

    @property
    def width(self) -> float:
        return self._config.width

    @property
    def residual(self) -> bool:
        return self._config.residual

    @property
    def residual_mode(self) -> str:
        return self._config.residual_mode

    @property
    def negative_slope(self) -> float:
        return self._config.negative_slope

    @property
    def deploy_changes(self) -> tuple[str, ...]:
        """How the collapsed layer differs from the plain layer this one replaced (see :attr:`EPConfig.deploy_changes`)."""
        return self._config.deploy_changes

    # ---- initialisation ---------------------------------------------------------
    _init_fan_mode: Literal["fan_in", "fan_out"] = "fan_in"

    def reset_parameters(self) -> None:
        """Kaiming-normal weights (gain for the following activation on the last layer), uniform biases.

        The same scheme as the original implementation, so training behaves alike.
        A layer on the meta device (built to check shapes, or to take a checkpoint's
        tensors) holds no values, so there is nothing to draw; skipping it also
        avoids ``normal_`` on meta, which imports ``torch._dynamo`` (about 1 s and 75 MB).
        """
        if next(self.parameters()).is_meta:
            return
        last = self._config.depth - 1
        for index, (layer, norm) in enumerate(self._blocks()):
            slope = self._config.negative_slope if index == last else 1.0
            self._init_weight(layer.weight, slope)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(layer.bias, -bound, bound)
            if norm is not None:
                norm.reset_parameters()
        for projection in self._projections().values():
            projection.reset_parameters()

    def _init_weight(self, weight: Tensor, slope: float) -> None:
        nn.init.kaiming_normal_(weight, a=slope, mode=self._init_fan_mode, nonlinearity="leaky_relu")

    # ---- forward ----------------------------------------------------------------
    def train(self, mode: bool = True) -> EPLayer:
        """Switch mode and drop the cached collapse (``eval()`` always collapses afresh, as in the original)."""
        self._cache = None
        return super().train(mode)

    def forward(self, x: Tensor, override: bool = False) -> Tensor:
        """Expanded graph in training mode (or with ``override``), the collapsed layer in eval mode."""
        if self.training or override or not self.collapse_on_eval:
            return self.expanded_forward(x)
        if _tracing() or self._needs_grad():
            weight, bias = self._collapsed_in_graph()
        else:
            weight, bias = self._collapsed()
        return self._collapsed_forward(x, weight, bias)

    def _needs_grad(self) -> bool:
        """Whether this forward must be differentiable w.r.t. the layer's parameters."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def expanded_forward(self, x: Tensor) -> Tensor:
        """Run the chain layer by layer, adding skips where they land."""
        nodes = {0: x}
        current = x
        for j, block in enumerate(self.layer_dict.values()):
            current = block(current)
            for source in self._incoming.get(j + 1, ()):
                current = current + self._skip_branch(nodes[source], (source, j + 1), current)
            nodes[j + 1] = current
        return current

    def _skip_branch(self, source: Tensor, edge: tuple[int, int], destination: Tensor) -> Tensor:
        raise NotImplementedError

    def _collapsed_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    # ---- collapse ---------------------------------------------------------------
    def collapse(self, *, dtype: torch.dtype = torch.float64) -> Affine:
        """The exact collapsed map in float64 (no caching; see ``weight`` / ``bias`` for the cached cast).

        The weight is laid out as the plain layer it collapses to stores it (``[in, out]`` for an
        ``EPLinear`` with ``weight_layout="in_out"``), so it loads into that layer as is.

        ``dtype=torch.float32`` computes it in float32 instead: not exact, for analyses that need no more (the
        approximate spectra of ``epcli inspect``), at about half the time and memory.
        """
        with torch.no_grad():
            layers, skips = self._chain(dtype)
            return self._deployed(collapse_chain(self._algebra, self._config.in_dim, layers, skips, dtype=dtype, lean=True))

    def release_collapse(self) -> Affine:
        """:meth:`collapse`, leaving this layer on the meta device (no data): each chain layer is given back once it
        is composed (unless something else holds its tensors), so a caller that drops the layer after collapsing
        it never holds the whole chain beside its float64 product. Skip projections are held to the end."""
        with torch.no_grad():
            layers, skips = self._chain(torch.float64, detach=True)
            return self._released(_drain(layers), skips)

    def streamed_collapse(
        self,
        read: Callable[[list[str]], Mapping[str, Tensor]],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Affine:
        """:meth:`release_collapse` of this layer built on the meta device, with its tensors read as the collapse
        needs them: ``read(keys)`` returns the tensors of ``keys`` (as in :meth:`state_dict`), called for the skip
        projections first (held to the end), then for each chain layer with its batch-norm, which is given back
        once composed. So only one chain layer is ever held beside the float64 product, not the whole layer.
        What is read is cast to ``dtype`` / ``device`` as ``Module.to`` casts (floating tensors only)."""
        blocks = {name: f"layer_dict.{name}." for name in self.layer_dict}
        keys = list(self.state_dict())
        owned = {name: [key for key in keys if key.startswith(prefix)] for name, prefix in blocks.items()}
        rest = [key for key in keys if not any(key.startswith(prefix) for prefix in blocks.values())]
        if rest:  # the skip projections
            self.load_state_dict({**self.state_dict(), **read(rest)}, strict=True, assign=True)
            self.residual_dict.to(device=device, dtype=dtype)  # the blocks are still on the meta device

        def chain() -> Iterator[ChainLayer]:
            for (name, prefix), (layer, norm) in zip(blocks.items(), self._blocks(), strict=True):
                block = self.layer_dict[name]
                state = read(owned[name])
                block.load_state_dict({key[len(prefix) :]: state[key] for key in owned[name]}, strict=True, assign=True)
                del state
                block.to(device=device, dtype=dtype)
                bias = None if layer.bias is None else layer.bias.detach()
                held = [ChainLayer(layer.weight.detach(), bias, None if norm is None else _fold(norm, torch.float64))]
                del bias
                block.to(device="meta")  # the only references left are held's: handed over below
                yield held.pop()

        with torch.no_grad():
            # the skips only: the chain's own layers are meta stand-ins here, and folding their batch-norms on the
            # meta device would import torch._dynamo (about 1 s) for nothing
            return self._released(chain(), self._skips(detach=True))

    def _released(self, layers: Iterable[ChainLayer], skips: dict[tuple[int, int], ChainLayer | None]) -> Affine:
        """The collapse of ``layers`` and ``skips`` (this layer's, detached), with this layer emptied first so that
        they hold the only references: each chain layer is given back once composed."""
        self.to(device="meta")
        self._cache = None
        return self._deployed(collapse_chain(self._algebra, self._config.in_dim, layers, skips, lean=True))

    def _chain(
        self, dtype: torch.dtype, *, detach: bool = False
    ) -> tuple[list[ChainLayer], dict[tuple[int, int], ChainLayer | None]]:
        """The chain's layers (batch-norms folded in ``dtype``) and skips as :func:`~epcli.core.collapse_chain`
        takes them; ``detach``: tensors that share the parameters' storage but not the parameters themselves."""
        layers = []
        for layer, norm in self._blocks():
            fold = None if norm is None else _fold(norm, dtype)
            layers.append(ChainLayer(_own(layer.weight, detach), _own(layer.bias, detach), fold))  # type: ignore[arg-type]
        return layers, self._skips(detach=detach)

    def _skips(self, *, detach: bool = False) -> dict[tuple[int, int], ChainLayer | None]:
        """The skips of :meth:`_chain`: each edge's projection (None for an identity skip)."""
        projections = self._projections()
        skips: dict[tuple[int, int], ChainLayer | None] = {}
        for edge in self._config.skips:
            projection = projections.get(self.skip_key(edge))
            skips[edge] = (
                None if projection is None
                else ChainLayer(_own(projection.weight, detach), _own(projection.bias, detach))  # type: ignore[arg-type]
            )
        return skips

    def _collapse_chain(self, *, unalias: bool = True) -> Affine:
        """The collapse as plain tensor ops: differentiable under grad mode, traceable by dynamo."""
        layers, skips = self._chain(torch.float64)
        return self._deployed(collapse_chain(self._algebra, self._config.in_dim, layers, skips, unalias=unalias))

    def _deployed(self, affine: Affine) -> Affine:
        """The collapse in the layout of the plain layer it collapses to (the algebra's own layout unless overridden)."""
        return affine

    def _cast(self, affine: Affine) -> tuple[Tensor, Tensor | None]:
        """The float64 collapse in the layer's dtype (that of its first weight)."""
        dtype = self._blocks()[0].layer.weight.dtype
        return affine.weight.to(dtype), None if affine.bias is None else affine.bias.to(dtype)

    def _collapsed_in_graph(self) -> tuple[Tensor, Tensor | None]:
        """Weight and bias computed afresh, with autograd history and without the Python cache."""
        return self._cast(self._collapse_chain(unalias=False))

    def _fingerprint(self) -> tuple[Any, ...]:
        tensors = tuple(
            (t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in (*self.parameters(), *self.buffers())
        )
        eps = tuple(norm.eps for _, norm in self._blocks() if norm is not None)
        return (_optimizer_steps, *tensors, *eps)

    def _collapsed(self) -> tuple[Tensor, Tensor | None]:
        key = self._fingerprint()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *self._cast(self.collapse()))
        return self._cache[1], self._cache[2]

    @property
    def weight(self) -> Tensor:
        """Collapsed weight in the layer's dtype (recomputed only when parameters change)."""
        return self._collapsed()[0]

    @property
    def bias(self) -> Tensor | None:
        """Collapsed bias, or None when no layer, batch-norm or projection contributes one."""
        return self._collapsed()[1]

    # ---- state_dict compatibility -----------------------------------------------
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in _STALE_COLLAPSED_KEYS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
