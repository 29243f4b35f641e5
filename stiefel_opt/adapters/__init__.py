"""Geometric low-rank adapters: LoRA, DoRA, PoLAR, StelLA, SymLoRA, and any method added with
:func:`register_adapter` (an ``AdapterLayer`` subclass under a name).

Layers wrap a frozen ``nn.Linear``/``Conv1D``; Stiefel factors are ``StiefelParameter``s, so any
optimizer of :mod:`stiefel_opt.optim` (or geoopt) sees ordinary constrained parameters.
peft, transformers and safetensors are imported only by the functions that need them.

    cfg = AdapterConfig("polar", r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inject_adapters(model, cfg)                      # only adapter parameters stay trainable
    opt = LandingAdam(param_groups(model, lr=4e-3), lr=4e-3)
    ...
    save_adapters(model, "ckpt")                     # our format (factors)
    export_peft(model, "peft_ckpt")                  # plain PEFT LoRA, exact (lora_alpha = r)
"""
from .base import METHODS, register_adapter
from .groups import param_groups
from .inject import (
    AdapterConfig,
    AdapterState,
    adapter_config,
    adapter_layers,
    inject_adapters,
    lora_pairs,
    merge_adapters,
    merge_and_unload,
    unmerge_adapters,
)
from .io import adapter_state_dict, export_peft, load_adapters, peft_state_dict, save_adapters
from .layers import AdapterLayer, DoraLayer, LoraLayer, PolarLayer, StellaLayer, SymLoraLayer
from .monitor import AdapterMonitor

__all__ = [
    "METHODS",
    "register_adapter",
    "AdapterConfig",
    "AdapterState",
    "AdapterLayer",
    "LoraLayer",
    "DoraLayer",
    "PolarLayer",
    "StellaLayer",
    "SymLoraLayer",
    "inject_adapters",
    "adapter_layers",
    "lora_pairs",
    "adapter_config",
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
    "adapter_state_dict",
    "save_adapters",
    "load_adapters",
    "export_peft",
    "peft_state_dict",
    "param_groups",
    "AdapterMonitor",
    "AdapterDiagnosticsCallback",
]


def __getattr__(name):
    if name == "AdapterDiagnosticsCallback":
        from . import monitor

        return monitor.AdapterDiagnosticsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
