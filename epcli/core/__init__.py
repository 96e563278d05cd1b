"""Pure collapse math: tensors in, tensors out; no modules, files or printing."""

from epcli.core.affine import Affine, BatchNormFold
from epcli.core.graph import CONV2D, LINEAR, ChainLayer, SkipEdge, collapse_chain, skip_edges

__all__ = [
    "Affine",
    "BatchNormFold",
    "CONV2D",
    "LINEAR",
    "ChainLayer",
    "SkipEdge",
    "collapse_chain",
    "skip_edges",
]
