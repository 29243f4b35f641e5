"""``AdapterConfig`` and injection, with PEFT's names and matching rules.

Matching (module names as ``model.named_modules()`` gives them):
- ``exclude_modules`` first: a string is a full regex match, a list matches exact names or suffixes.
- Modules inside a ``modules_to_save`` entry are never wrapped.
- ``target_modules``: a string is a full regex match (``re.fullmatch``); a list matches an exact
  name or a suffix ``.<entry>``; ``"all-linear"`` takes every ``nn.Linear``/``Conv1D`` except a
  transformers model's output head (``get_output_embeddings()``, else its ``score``/``classifier``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass

from torch import Tensor, nn

from .base import METHODS, AdapterLayer, adapter_class, is_conv1d
from .layers import LoraLayer

__all__ = [
    "AdapterConfig",
    "AdapterState",
    "METHODS",
    "inject_adapters",
    "adapter_layers",
    "adapter_config",
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
]

_STATE_ATTR = "_stiefel_adapter_state"


@dataclass
class AdapterConfig:
    """What to inject and where. Field names and semantics follow PEFT's ``LoraConfig``.

    Args:
        method: a registered method (:data:`METHODS`): ``"lora"``, ``"dora"``, ``"polar"``,
            ``"stella"``, ``"symlora"`` or one added with :func:`register_adapter`.
        r: rank; ``lora_alpha``: scale numerator, s = α/r (α/√r with ``use_rslora``).
        lora_dropout: dropout on the adapter's input.
        target_modules: regex string, list of names/suffixes, or ``"all-linear"`` (required).
        exclude_modules: regex string or list of names/suffixes never wrapped.
        modules_to_save: modules (names or suffixes) left trainable and saved whole, e.g. a head.
        init: one of the method's ``inits``: ``"default"`` (every method), ``"gaussian"``
            (lora/dora), ``"svd"`` (polar/stella: factors from the top-r singular vectors of W).
        core: one of the method's ``cores``: for polar/stella/symlora ``"full"`` (r×r) or
            ``"diag"``; None takes the method's ``default_core`` (full for polar/stella, diag for
            symlora).
    """

    method: str
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    init: str = "default"
    use_rslora: bool = False
    core: str | None = None

    def __post_init__(self):
        layer_class = adapter_class(self.method)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"AdapterConfig: r must be a positive int, got {self.r!r}")
        for name in ("lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"AdapterConfig: {name} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"AdapterConfig: lora_alpha must be finite, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"AdapterConfig: lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"AdapterConfig: use_rslora must be a bool, got {self.use_rslora!r}")
        if self.target_modules is None:
            raise ValueError(
                "AdapterConfig: target_modules is required: a regex string, a list of module names "
                "or suffixes (e.g. ['q_proj', 'v_proj']), or 'all-linear'"
            )
        layer_class.check_options(self.init, self.core, "AdapterConfig")
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (tuple, set)):
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        for name, regex_ok in (("target_modules", True), ("exclude_modules", True), ("modules_to_save", False)):
            _check_names(name, getattr(self, name), regex_ok)

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serializable); ``from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        """Rebuild a config from :meth:`to_dict`'s output (validated as the constructor does);
        unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"AdapterConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _check_names(field_name: str, value, regex_ok: bool) -> None:
    """``value`` is None, a (regex) string when ``regex_ok``, or a list of non-empty strings."""
    if value is None or (regex_ok and isinstance(value, str)):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        kinds = "a regex string or a list of module names" if regex_ok else "a list of module names"
        raise TypeError(f"AdapterConfig: {field_name} must be {kinds}, got {value!r}")
    if "" in value:
        raise ValueError(f"AdapterConfig: {field_name} has an empty entry (it would match the root module), "
                         f"got {value!r}")


def _matches_list(name: str, entries) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _excluded(name: str, exclude) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return _matches_list(name, exclude)


def _in_saved(name: str, saved) -> bool:
    if not saved:
        return False
    return any(re.fullmatch(rf"(.*\.)?{re.escape(m)}(\..*)?", name) for m in saved)


def _output_head(model: nn.Module) -> nn.Module | None:
    """A transformers model's output head: ``get_output_embeddings()`` (an LM head) or, when that
    is None, the classification head ``score``/``classifier`` (PEFT's rule for SEQ_CLS)."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        head = next((m for m in (getattr(model, n, None) for n in ("score", "classifier"))
                     if isinstance(m, nn.Module)), None)
    return head


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that could be wrapped (not inside an adapter layer)."""
    out, inside = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, AdapterLayer):
            inside.append(name)
            continue
        if name:
            out.append((name, m))
    return out


def _targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    tm = config.target_modules
    head = _output_head(model)
    chosen = []
    for name, m in _candidates(model):
        if _excluded(name, config.exclude_modules) or _in_saved(name, config.modules_to_save):
            continue
        if isinstance(tm, str) and tm.lower() == "all-linear":
            hit = _is_linear(m) and m is not head
        elif isinstance(tm, str):
            hit = re.fullmatch(tm, name) is not None
        else:
            hit = _matches_list(name, tm)
        if hit:
            chosen.append((name, m))
    if not chosen:
        linear = [n for n, m in _candidates(model) if _is_linear(m)]
        shown = ", ".join(linear[:20]) + (f", … ({len(linear)} in all)" if len(linear) > 20 else "")
        raise ValueError(
            f"inject_adapters: target_modules={tm!r} (exclude_modules={config.exclude_modules!r}) matches no "
            f"module of {type(model).__name__}; Linear/Conv1D candidates: [{shown}]"
        )
    return chosen


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The adapter layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def lora_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """The (A, B) factor pairs (A: r×in, B: out×r, ΔW ∝ BA) of the LoRA/DoRA layers, for LoRARITE."""
    return [(m.lora_A, m.lora_B) for m in adapter_layers(model).values() if isinstance(m, LoraLayer)]


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The config ``model`` was injected with, or None."""
    state = AdapterState.of(model)
    return None if state is None else state.config


class AdapterState:
    """The owner of an adapted model's adapter state, stored on the model by
    :func:`inject_adapters`: the ``config``, the wrapped module names (``targets``, sorted) and
    through the config the ``modules_to_save`` entries. It holds names, not modules, so a copy of
    the model carries a valid state. Saving, loading and exporting use only these methods."""

    def __init__(self, config: AdapterConfig, targets):
        self.config = config
        self.targets = tuple(sorted(targets))

    @staticmethod
    def of(model: nn.Module) -> "AdapterState | None":
        """The state of ``model`` (None when it has no adapters injected)."""
        state = getattr(model, _STATE_ATTR, None)
        return state if isinstance(state, AdapterState) else None

    @classmethod
    def require(cls, model: nn.Module, who: str) -> "AdapterState":
        """The state of ``model``; ``ValueError`` (prefixed ``who``) when it has no adapters."""
        state = cls.of(model)
        if state is None or not adapter_layers(model):
            raise ValueError(f"{who}: {type(model).__name__} has no adapters; call inject_adapters(model, config) first")
        return state

    def layers(self, model: nn.Module) -> dict[str, AdapterLayer]:
        """The adapter layers of ``model`` by module name."""
        return adapter_layers(model)

    def is_saved(self, name: str) -> bool:
        """True when module ``name`` lies inside a ``modules_to_save`` entry (never wrapped)."""
        return _in_saved(name, self.config.modules_to_save)

    def saved_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs the ``modules_to_save`` entries match (names or suffixes);
        ``ValueError`` for an entry that matches nothing."""
        found = []
        for m in self.config.modules_to_save or ():
            hits = [(n, mod) for n, mod in model.named_modules() if _matches_list(n, (m,))]
            if not hits:
                raise ValueError(f"inject_adapters: modules_to_save entry {m!r} matches no module of "
                                 f"{type(model).__name__}")
            found += hits
        return found

    def build(self, modules: dict[str, nn.Module], *, shapes_only: bool = False) -> dict[str, AdapterLayer]:
        """New layers of the registered ``config.method`` class around ``modules[name]`` for each
        target, not attached to any model (``shapes_only``: see :meth:`AdapterLayer.from_config`)."""
        cls = adapter_class(self.config.method)
        return {name: cls.from_config(modules[name], self.config, name, shapes_only=shapes_only)
                for name in self.targets}

    def parameters(self, model: nn.Module, layers: dict[str, AdapterLayer] | None = None) -> dict[str, Tensor]:
        """What a checkpoint holds, by name in ``model``: the parameters of the adapter ``layers``
        (default: those of ``model``) except their base layers', and of the ``modules_to_save``."""
        out: dict[str, Tensor] = {}
        for lname, layer in (self.layers(model) if layers is None else layers).items():
            for pname, p in layer.named_parameters():
                if not pname.startswith("base_layer."):
                    out[f"{lname}.{pname}"] = p
        for mname, mod in self.saved_modules(model):
            for pname, p in mod.named_parameters():
                out[f"{mname}.{pname}"] = p
        return out

    def unload(self, model: nn.Module, *, merge: bool, safe_merge: bool = False) -> nn.Module:
        """Put the base layers of ``model`` back (after merging ΔW into them when ``merge``) and
        remove the state from it; returns ``model``."""
        return _unload(model, merge, safe_merge)


def _merge_all(model: nn.Module, safe_merge: bool) -> None:
    """Merge every unmerged adapter; with ``safe_merge`` every layer is checked before any is written
    (one bad layer leaves the model as it was)."""
    todo = [layer for layer in adapter_layers(model).values() if not layer.merged]
    if safe_merge:
        for layer in todo:
            layer.check_merge()
    for layer in todo:
        layer.merge()


def _unload(model: nn.Module, merge: bool, safe_merge: bool = False) -> nn.Module:
    if merge:
        _merge_all(model, safe_merge)
    for name, layer in adapter_layers(model).items():
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, _STATE_ATTR):
        delattr(model, _STATE_ATTR)
    return model


def inject_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Wrap the matched modules of ``model`` in place with ``config.method`` adapters.

    Afterwards only adapter parameters (and ``modules_to_save``) have ``requires_grad``.
    Returns ``model``. A model that already has adapters raises ``ValueError``.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"inject_adapters: config must be an AdapterConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise ValueError("inject_adapters: the model already has adapters; merge_and_unload it first")
    targets = _targets(model, config)
    for name, m in targets:
        if not _is_linear(m):
            raise TypeError(
                f"inject_adapters: {name} is a {type(m).__name__}; adapters wrap nn.Linear and transformers "
                "Conv1D only — narrow target_modules or add it to exclude_modules"
            )
    state = AdapterState(config, (name for name, _ in targets))
    saved = state.saved_modules(model)
    new_layers = state.build(dict(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers.items():
        _set_submodule(model, name, layer)
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer."):
                p.requires_grad_(True)
    for _, mod in saved:
        for p in mod.parameters():
            p.requires_grad_(True)
    setattr(model, _STATE_ATTR, state)
    return model


def merge_adapters(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every unmerged adapter into its base weight (``safe_merge``: all checked before any is written)."""
    _merge_all(model, safe_merge)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Unmerge every merged adapter layer of ``model`` in place, W ← W − ΔW (the inverse of
    :func:`merge_adapters`; unmerged layers are left alone); returns ``model``."""
    for layer in adapter_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every adapter and put the base layers back: a plain model with W + ΔW."""
    if not adapter_layers(model):
        raise ValueError(f"merge_and_unload: {type(model).__name__} has no adapters")
    return _unload(model, merge=True, safe_merge=safe_merge)
