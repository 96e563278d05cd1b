"""Pure collapse math: tensors in, tensors out; no modules, files or printing."""

from epcli.core.affine import Affine, BatchNormFold
from epcli.core.conv import ConvAlgebra
from epcli.core.graph import LINEAR, ChainLayer, SkipEdge, collapse_chain, skip_edges

__all__ = [
    "LINEAR",
    "Affine",
    "BatchNormFold",
    "ChainLayer",
    "ConvAlgebra",
    "SkipEdge",
    "collapse_chain",
    "skip_edges",
]
