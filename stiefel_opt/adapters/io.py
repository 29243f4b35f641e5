"""Adapter state dict, save/load (safetensors + JSON config) and exact export to PEFT LoRA.

Native checkpoint (a directory): ``stiefel_adapter_config.json`` (the ``AdapterConfig``, the
wrapped module names, a format number) and ``stiefel_adapter.safetensors`` (adapter and
``modules_to_save`` parameters by their names in the model).

PEFT export: every method is exactly a rank-r LoRA, B A = ΔW with scaling folded into B and
``lora_alpha = r`` (PEFT scaling 1): LoRA (s·B, A), PoLAR (s·XΘ, Yᵀ), StelLA (s·US, Vᵀ), SymLoRA
(s·Q diag(λ), Qᵀ); DoRA adds ``lora_magnitude_vector`` and ``use_dora``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .inject import (
    _CONFIG_ATTR,
    AdapterConfig,
    _saved_modules,
    _set_submodule,
    adapter_config,
    adapter_layers,
    inject_adapters,
)
from .layers import DoraLayer

__all__ = ["adapter_state_dict", "save_adapters", "load_adapters", "export_peft", "peft_state_dict"]

CONFIG_NAME = "stiefel_adapter_config.json"
WEIGHTS_NAME = "stiefel_adapter.safetensors"
_FORMAT = 1


def _require_adapters(model: nn.Module, who: str):
    layers = adapter_layers(model)
    config = adapter_config(model)
    if not layers or config is None:
        raise ValueError(f"{who}: {type(model).__name__} has no adapters; call inject_adapters(model, config) first")
    return layers, config


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter and ``modules_to_save`` parameters, keyed by their names in ``model`` (detached)."""
    layers, config = _require_adapters(model, "adapter_state_dict")
    out: dict[str, Tensor] = {}
    for lname, layer in layers.items():
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer."):
                out[f"{lname}.{pname}"] = p.detach()
    for mname, mod in _saved_modules(model, config.modules_to_save):
        for pname, p in mod.named_parameters():
            out[f"{mname}.{pname}"] = p.detach()
    return out


def _plain(t: Tensor) -> Tensor:
    return t.detach().as_subclass(torch.Tensor).clone().contiguous()


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` to ``directory`` (created if needed); returns the path."""
    from safetensors.torch import save_file

    layers, config = _require_adapters(model, "save_adapters")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("save_adapters: some adapters are merged; unmerge_adapters(model) before saving")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: _plain(v) for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": _FORMAT, "config": config.to_dict(), "targets": sorted(layers)}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (injecting them first if the
    model has none). Any missing, unexpected or mis-shaped tensor raises ``ValueError``; nothing
    is loaded partially, and adapters injected by a failed load are removed again."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ValueError(f"load_adapters: {p} not found; expected a directory written by save_adapters")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"load_adapters: unsupported checkpoint format {meta.get('format')!r} (expected {_FORMAT})")
    saved_config = AdapterConfig.from_dict(meta["config"])
    if not adapter_layers(model):
        exact = AdapterConfig.from_dict({**meta["config"], "target_modules": meta["targets"], "exclude_modules": None})
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        inject_adapters(model, exact)
        try:
            return _load_tensors(model, directory, w_path)
        except Exception:
            _uninject(model, trainable)  # a failed load leaves the model as it was
            raise
    current = adapter_config(model)
    for key in ("method", "r", "lora_alpha", "use_rslora", "core"):
        if getattr(current, key) != getattr(saved_config, key):
            raise ValueError(
                f"load_adapters: the model's adapters have {key}={getattr(current, key)!r}, the checkpoint "
                f"{key}={getattr(saved_config, key)!r}"
            )
    return _load_tensors(model, directory, w_path)


def _uninject(model: nn.Module, trainable: set[int]) -> None:
    """Put the base layers back (no merge) and restore which parameters were trainable."""
    for name, layer in adapter_layers(model).items():
        _set_submodule(model, name, layer.base_layer)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    delattr(model, _CONFIG_ATTR)


def _load_tensors(model: nn.Module, directory: Path, w_path: Path) -> nn.Module:
    """Copy the checkpoint into the adapters of ``model``, all or nothing."""
    from safetensors.torch import load_file

    own = adapter_state_dict(model)
    tensors = load_file(str(w_path))
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    bad = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or bad:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)}: {missing[:5]}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)}: {unexpected[:5]}")
        if bad:
            lines.append("shape mismatch: " + ", ".join(
                f"{k} model {tuple(own[k].shape)} vs checkpoint {tuple(tensors[k].shape)}" for k in bad[:5]))
        raise ValueError(f"load_adapters: the checkpoint in {directory} does not fit this model ({'; '.join(lines)})")
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise ValueError("load_adapters: some adapters are merged; unmerge_adapters(model) before loading")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(tensors[k])
    return model


def peft_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """The PEFT LoRA tensors (``base_model.model.<module>.lora_A.weight`` …) and
    ``adapter_config.json`` contents that reproduce the adapters of ``model`` exactly."""
    layers, config = _require_adapters(model, "export_peft")
    ranks = {layer.r for layer in layers.values()}
    (r,) = ranks
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.merged:
                raise ValueError(f"export_peft: {name} is merged; unmerge_adapters(model) before exporting")
            b, a = layer.delta_factors()
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = _plain(a)
            tensors[f"{prefix}.lora_B.weight"] = _plain(b)
            if isinstance(layer, DoraLayer):
                tensors[f"{prefix}.lora_magnitude_vector"] = _plain(layer.lora_magnitude)
        for mname, mod in _saved_modules(model, config.modules_to_save):
            for pname, p in mod.named_parameters():
                tensors[f"base_model.model.{mname}.{pname}"] = _plain(p)
    peft_config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "target_modules": sorted(layers),
        "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "use_dora": config.method == "dora",
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, peft_config


def export_peft(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                task_type: str | None = None) -> Path:
    """Write a plain PEFT LoRA checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``peft.PeftModel.from_pretrained(base, directory)`` loads into the same function.

    ``task_type`` (e.g. ``"CAUSAL_LM"``) picks PEFT's model class; ``base_model_name_or_path`` is
    recorded for tools that read it.
    """
    from safetensors.torch import save_file

    tensors, peft_config = peft_state_dict(model)
    peft_config["task_type"] = task_type
    peft_config["base_model_name_or_path"] = base_model_name_or_path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return directory
