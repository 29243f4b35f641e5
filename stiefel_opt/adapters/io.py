"""Adapter state dict, save/load (safetensors + JSON config) and exact export to PEFT LoRA.

Native checkpoint (a directory): ``stiefel_adapter_config.json`` (the ``AdapterConfig``, the
wrapped module names, a format number, the SHA-256 of the weights file and the worst
‖XᵀX − I‖_F of the saved Stiefel factors) and ``stiefel_adapter.safetensors`` (adapter and
``modules_to_save`` parameters by their names in the model). Both files are written to new
temporary files and renamed into place; a load checks everything against the weights file
before it touches the model.

PEFT export: every method is exactly a rank-r LoRA, B A = ΔW with scaling folded into B and
``lora_alpha = r`` (PEFT scaling 1): LoRA (s·B, A), PoLAR (s·XΘ, Yᵀ), StelLA (s·US, Vᵀ), SymLoRA
(s·Q diag(λ), Qᵀ); DoRA adds ``lora_magnitude_vector`` and ``use_dora``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import numbers
import os
import re
import secrets
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import functional as F
from ..manifolds import StiefelParameter, _tolerance
from .inject import AdapterConfig, AdapterState, inject_adapters
from .layers import DoraLayer

__all__ = ["adapter_state_dict", "save_adapters", "load_adapters", "export_peft", "peft_state_dict"]

CONFIG_NAME = "stiefel_adapter_config.json"
WEIGHTS_NAME = "stiefel_adapter.safetensors"
_FORMAT = 2
_META_KEYS = frozenset({"format", "config", "targets", "weights_sha256", "stiefel_distance"})


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter and ``modules_to_save`` parameters, keyed by their names in ``model`` (detached)."""
    state = AdapterState.require(model, "adapter_state_dict")
    return {k: p.detach() for k, p in state.parameters(model).items()}


def _plain(t: Tensor) -> Tensor:
    return t.detach().as_subclass(torch.Tensor).clone().contiguous()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write each file to a new temporary file in ``directory``, then rename them into place: a
    reader never sees a half-written file, and a symlink at the target is replaced, not followed."""
    tmps: list[Path] = []
    try:
        for name, data in files.items():
            tmp = directory / f".{name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # fails on any existing path
            tmps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, name in zip(tmps, files):
            os.replace(tmp, directory / name)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` to ``directory`` (created if needed); returns the path.

    Both files are written to temporary files and renamed into place; the JSON records the
    SHA-256 of the weights file, so a weights file from another save is refused at load."""
    from safetensors.torch import save

    state = AdapterState.require(model, "save_adapters")
    layers = state.layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("save_adapters: some adapters are merged; unmerge_adapters(model) before saving")
    distances = []
    for lname, layer in layers.items():
        for pname, x in layer.stiefel_factors().items():
            d = float(F.infeasibility(x.manifold.to_matrix(x.detach())).max())
            if not d < 1.0:  # NaN too; no optimizer of the package leaves X this far off
                raise ValueError(f"save_adapters: the Stiefel factor {lname}.{pname} has ‖XᵀX − I‖_F = {d:.3e} "
                                 "(non-finite or >= 1); not saved — project it with Stiefel().projx first")
            distances.append(d)
    tensors = {k: _plain(v) for k, v in adapter_state_dict(model).items()}
    weights = save(tensors, metadata={"format": "pt"})
    meta = {"format": _FORMAT, "config": state.config.to_dict(), "targets": sorted(layers),
            "weights_sha256": _sha256(weights), "stiefel_distance": max(distances, default=0.0)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_files(directory, {WEIGHTS_NAME: weights,
                             CONFIG_NAME: json.dumps(meta, indent=2, sort_keys=True).encode()})
    return directory


def _read_meta(cfg_path: Path) -> tuple[AdapterConfig, list[str], str, float]:
    """The checkpoint's config, target module names, weights digest and Stiefel distance, each
    validated (types, bounds) before anything is built from them."""
    where = f"load_adapters: {cfg_path}"
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{where} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object written by save_adapters, got a {type(meta).__name__}")
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{where}: unsupported checkpoint format {meta.get('format')!r} (expected {_FORMAT})")
    unknown, missing = sorted(set(meta) - _META_KEYS), sorted(_META_KEYS - set(meta))
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    if not isinstance(meta["config"], dict):
        raise ValueError(f"{where}: config must be a JSON object, got {meta['config']!r:.80}")
    try:
        config = AdapterConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None
    targets = meta["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{where}: targets must be a list of module names, got {targets!r:.80}")
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise ValueError(f"{where}: targets names {twice[:5]} twice")
    digest, distance = meta["weights_sha256"], meta["stiefel_distance"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"{where}: weights_sha256 must be 64 lowercase hex digits, got {digest!r:.80}")
    if isinstance(distance, bool) or not isinstance(distance, numbers.Real) or not 0.0 <= distance < 1.0:
        raise ValueError(f"{where}: stiefel_distance must be a number in [0, 1), got {distance!r:.80}")
    return config, targets, digest, float(distance)


def _meta_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose own parameters are on the meta device (shapes, no data)."""
    twin = copy.copy(module)
    twin._parameters = {k: None if p is None else nn.Parameter(p.detach().to("meta"), requires_grad=False)
                        for k, p in module._parameters.items()}
    return twin


def _planned(model: nn.Module, config: AdapterConfig, targets: list[str], cfg_path: Path) -> dict[str, Tensor]:
    """The parameters (on the meta device: no memory) that injecting ``config`` into ``targets``
    would create, with the ``modules_to_save`` parameters: what the weights file must hold."""
    modules = dict(model.named_modules())
    plan = AdapterState(config, targets)
    for name in plan.targets:
        if name not in modules:
            raise ValueError(f"load_adapters: {cfg_path}: target {name!r} is not a module of {type(model).__name__}")
        if plan.is_saved(name):
            raise ValueError(f"load_adapters: {cfg_path}: target {name!r} lies inside a modules_to_save entry")
    try:
        layers = plan.build({name: _meta_twin(modules[name]) for name in plan.targets}, shapes_only=True)
    except (TypeError, ValueError) as err:
        raise type(err)(f"load_adapters: {cfg_path}: {err}") from None
    return plan.parameters(model, layers)


def _check_fit(expected: dict[str, Tensor], tensors: dict[str, Tensor], directory: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    bad = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or bad:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)}: {missing[:5]}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)}: {unexpected[:5]}")
        if bad:
            lines.append("shape mismatch: " + ", ".join(
                f"{k} model {tuple(expected[k].shape)} vs checkpoint {tuple(tensors[k].shape)}" for k in bad[:5]))
        raise ValueError(f"load_adapters: the checkpoint in {directory} does not fit this model ({'; '.join(lines)})")


def _check_stiefel(expected: dict[str, Tensor], tensors: dict[str, Tensor], w_path: Path, distance: float) -> None:
    """Every tensor is floating point and finite; each Stiefel factor is orthonormal within
    ``StiefelParameter``'s tolerance plus the distance recorded at save time (a landing optimizer keeps
    X near, not on, the manifold)."""
    for key, p in expected.items():
        t = tensors[key]
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"load_adapters: {w_path}: the tensor {key!r} has non-finite entries "
                             "(or is not floating point); the file is corrupt")
        if not isinstance(p, StiefelParameter):
            continue
        m = p.manifold.to_matrix(t.to(torch.promote_types(t.dtype, torch.float32)))
        d = float(F.infeasibility(m).max())
        tol = _tolerance(t.dtype, min(m.shape[-2:])) + distance
        if not d <= tol:
            raise ValueError(f"load_adapters: {w_path}: the Stiefel factor {key!r} is not orthonormal "
                             f"(‖XᵀX − I‖_F = {d:.3e} > {tol:.1e}); the file is corrupt")


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (injecting them first if the
    model has none).

    Before the model is touched: the JSON's fields are validated (types, bounds, no regex is run),
    the weights file must match the JSON's SHA-256, its tensor names and shapes must be exactly
    those the config and target module names give for this model (checked on the meta device, so
    a forged rank allocates nothing), and every Stiefel factor must be finite and orthonormal. Any
    failure raises ``ValueError`` naming the file; nothing is loaded partially."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ValueError(f"load_adapters: {p} not found; expected a directory written by save_adapters")
    config, targets, digest, distance = _read_meta(cfg_path)
    data = w_path.read_bytes()
    if _sha256(data) != digest:
        raise ValueError(f"load_adapters: {w_path} does not match the digest in {cfg_path} (a save_adapters "
                         "interrupted between the two files, or a changed file); save the adapters again")
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise ValueError(f"load_adapters: {w_path} is not a readable safetensors file ({err})") from None
    state = AdapterState.of(model)
    layers = state.layers(model) if state is not None else {}
    if layers:
        current = state.config
        for key in ("method", "r", "lora_alpha", "use_rslora", "core"):
            if getattr(current, key) != getattr(config, key):
                raise ValueError(
                    f"load_adapters: the model's adapters have {key}={getattr(current, key)!r}, the checkpoint "
                    f"{key}={getattr(config, key)!r}"
                )
        if any(layer.merged for layer in layers.values()):
            raise ValueError("load_adapters: some adapters are merged; unmerge_adapters(model) before loading")
        expected = state.parameters(model, layers)
    else:
        expected = _planned(model, config, targets, cfg_path)
    _check_fit(expected, tensors, directory)
    _check_stiefel(expected, tensors, w_path, distance)
    if layers:
        return _copy_in(model, tensors, directory)
    # the saved names exactly (a list would also match them as suffixes of other modules' names)
    exact = AdapterConfig.from_dict({**config.to_dict(), "target_modules": "|".join(map(re.escape, targets)),
                                     "exclude_modules": None})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    inject_adapters(model, exact)
    try:
        return _copy_in(model, tensors, directory)
    except Exception:  # a failed load leaves the model as it was: base layers back, trainable as before
        AdapterState.of(model).unload(model, merge=False)
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        raise


def _copy_in(model: nn.Module, tensors: dict[str, Tensor], directory: Path) -> nn.Module:
    """Copy the checked tensors into the adapters of ``model`` (their names re-checked first)."""
    own = adapter_state_dict(model)
    _check_fit(own, tensors, directory)
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(tensors[k])
    return model


def peft_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict]:
    """The PEFT LoRA tensors (``base_model.model.<module>.lora_A.weight`` …) and
    ``adapter_config.json`` contents that reproduce the adapters of ``model`` exactly."""
    state = AdapterState.require(model, "export_peft")
    layers, config = state.layers(model), state.config
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
        for mname, mod in state.saved_modules(model):
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
        "use_dora": any(isinstance(layer, DoraLayer) for layer in layers.values()),
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
    from safetensors.torch import save

    tensors, peft_config = peft_state_dict(model)
    peft_config["task_type"] = task_type
    peft_config["base_model_name_or_path"] = base_model_name_or_path
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_files(directory, {"adapter_model.safetensors": save(tensors, metadata={"format": "pt"}),
                             "adapter_config.json": json.dumps(peft_config, indent=2, sort_keys=True).encode()})
    return directory
