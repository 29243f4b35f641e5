"""stiefel_opt: Riemannian and landing optimizers for PyTorch.

Layers (imports point down only): adapters → optim → manifolds → functional (→ kernels).
"""
from . import functional
from .manifolds import SharedQSpectral, Stiefel, StiefelParameter, constrain

__version__ = "0.1.0"

__all__ = [
    "functional",
    "Stiefel",
    "StiefelParameter",
    "SharedQSpectral",
    "constrain",
]
