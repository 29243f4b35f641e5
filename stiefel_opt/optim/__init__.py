"""Optimizers: Riemannian and landing SGD/Adam, and riemannian()/landing() for any torch optimizer.

Each optimizer is its ``torch.optim`` twin on Euclidean parameters; Stiefel parameters (a
``StiefelParameter``, a geoopt ``ManifoldParameter`` on a Stiefel manifold, or any parameter in a
param group with ``"manifold": "stiefel"``) get the manifold update, batched over equal shapes.
"""
from ._engine import BACKENDS, STEP_FUNCTIONS, register_step, step_function
from .landing import LandingAdam, LandingSGD
from .lora_rite import LoRARITE
from .riemannian import RiemannianAdam, RiemannianSGD
from .wrappers import TANGENT_STATE_KEYS, landing, riemannian

__all__ = [
    "RiemannianSGD",
    "RiemannianAdam",
    "LandingSGD",
    "LandingAdam",
    "LoRARITE",
    "riemannian",
    "landing",
    "TANGENT_STATE_KEYS",
    "BACKENDS",
    "STEP_FUNCTIONS",
    "register_step",
    "step_function",
]
