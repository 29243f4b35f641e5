"""stiefel_opt: Riemannian and landing optimizers for PyTorch.

Layers (imports point down only): adapters → optim → manifolds → functional (→ kernels).
"""
from . import functional
from .manifolds import MatrixManifold, SharedQSpectral, Stiefel, StiefelParameter, constrain
from .oblique import Oblique
from .optim.lora_rite import LoRARITE
from .optim import LandingAdam, LandingSGD, RiemannianAdam, RiemannianSGD, landing, riemannian
from . import diagnostics
from .adapters import (
    AdapterConfig,
    adapter_state_dict,
    export_peft,
    inject_adapters,
    load_adapters,
    merge_and_unload,
    param_groups,
    register_adapter,
    save_adapters,
)
from .diagnostics import adapter_report, feasibility, stable_rank
from . import recipes

__version__ = "0.1.0"

__all__ = [
    "functional",
    "recipes",
    "Stiefel",
    "Oblique",
    "MatrixManifold",
    "StiefelParameter",
    "SharedQSpectral",
    "constrain",
    "LoRARITE",
    "RiemannianSGD",
    "RiemannianAdam",
    "LandingSGD",
    "LandingAdam",
    "riemannian",
    "landing",
    "diagnostics",
    "AdapterConfig",
    "inject_adapters",
    "merge_and_unload",
    "adapter_state_dict",
    "save_adapters",
    "load_adapters",
    "export_peft",
    "param_groups",
    "register_adapter",
    "stable_rank",
    "feasibility",
    "adapter_report",
]
