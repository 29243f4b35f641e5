"""Adapter layers wrapping a frozen ``nn.Linear`` or transformers ``Conv1D``.

Every layer adds a rank-r update ΔW (out×in, the ``nn.Linear`` orientation) to its base layer:

- ``LoraLayer``     ΔW = s·B A,          A (r×in) Kaiming-uniform, B (out×r) = 0 (PEFT's init).
- ``DoraLayer``     W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row, the norm detached (PEFT's DoRA).
- ``PolarLayer``    ΔW = s·X Θ Yᵀ,       X ∈ St(out, r), Y ∈ St(in, r) random, Θ = 0.
- ``StellaLayer``   ΔW = s·U S Vᵀ,       U ∈ St(out, r), V ∈ St(in, r) random (or from the SVD of
  W), S = I (a non-zero start).
- ``SymLoraLayer``  ΔW = s·Q diag(λ) Qᵀ  (or s·Q sym(S) Qᵀ), Q ∈ St(n, r), λ = 0; square W only.

s = α/r, or α/√r with rsLoRA. Stiefel factors are stored tall, (out×r) and (in×r), as
``StiefelParameter``s. When unmerged, the forward computes x ↦ ((x Y) Θᵀ) Xᵀ, O(r(in+out)) per
token; ΔW is never formed (DoRA's row norms use ‖W_i‖² + 2s⟨W_i, (BA)_i⟩ + s²‖(BA)_i‖², also
without forming BA). Adapter parameters are fp32 when the base weight is fp16/bf16.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from ..manifolds import SharedQSpectral, StiefelParameter

__all__ = [
    "AdapterLayer",
    "LoraLayer",
    "DoraLayer",
    "PolarLayer",
    "StellaLayer",
    "SymLoraLayer",
    "LAYERS",
    "is_conv1d",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (weight stored (in, out), y = x W + b)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _check_init(method: str, init: str, allowed: tuple[str, ...]) -> None:
    if init not in allowed:
        raise ValueError(f"{method}: init must be one of {allowed}, got {init!r}")


class AdapterLayer(nn.Module):
    """Base class: holds the frozen ``base_layer``, the scaling, the input dropout and merging.

    Subclasses define :meth:`delta_factors` (B, A) with ΔW = B A (scaling included) and
    :meth:`_delta_forward` (x ↦ x ΔWᵀ without forming ΔW).
    """

    method: str = ""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, name: str = ""):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise TypeError(
                f"{self.method} adapter on {name or 'module'}: only nn.Linear and transformers Conv1D "
                f"are supported, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"{self.method} adapter on {name or 'module'}: r must be a positive int, got {r!r}")
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.module_name = name
        self.merged = False
        self._factory = {"device": w.device, "dtype": torch.float32 if w.dtype in _LOW_PRECISION else w.dtype}

    # --- shapes and the base weight ------------------------------------------------------------
    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of the adapter's own parameters (follows ``model.to(...)``)."""
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                return p.dtype
        return self._factory["dtype"]

    def base_weight(self) -> Tensor:
        """The frozen base weight in (out, in) orientation (a view; transposed for Conv1D)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _require_rank(self, limit: int, what: str) -> None:
        if self.r > limit:
            raise ValueError(
                f"{self.method} adapter on {self.module_name or 'module'} with weight (out={self.out_features}, "
                f"in={self.in_features}): r={self.r} exceeds {what}={limit}; use r <= {limit}"
            )

    # --- the update ----------------------------------------------------------------------------
    def delta_factors(self) -> tuple[Tensor, Tensor]:
        """(B, A), B (out×r), A (r×in), with ΔW = B A, scaling included."""
        raise NotImplementedError

    def _delta_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def stiefel_factors(self) -> dict[str, Tensor]:
        """The Stiefel-constrained factors of this layer, by parameter name."""
        return {n: p for n, p in self.named_parameters() if isinstance(p, StiefelParameter)}

    def delta_weight(self) -> Tensor:
        """ΔW (out×in) in the adapter dtype (materialized: for merging and tests only)."""
        b, a = self.delta_factors()
        return b @ a

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        h = self.lora_dropout(x.to(self.adapter_dtype))
        return result + self._delta_forward(h).to(result.dtype)

    # --- merging -------------------------------------------------------------------------------
    def _merged_weight(self, w: Tensor) -> Tensor:
        """W + ΔW for the (out, in) weight ``w`` (computed in the adapter dtype)."""
        return w.to(self.adapter_dtype) + self.delta_weight()

    def _unmerged_weight(self, w: Tensor) -> Tensor:
        return w.to(self.adapter_dtype) - self.delta_weight()

    def _write_weight(self, new_oi: Tensor) -> None:
        w = self.base_layer.weight
        w.data.copy_((new_oi.T if self.fan_in_fan_out else new_oi).to(w.dtype))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add ΔW to the base weight. ``safe_merge`` checks the result is finite before writing."""
        if self.merged:
            raise ValueError(f"{self.module_name or self.method}: the adapter is already merged; unmerge() first")
        new = self._merged_weight(self.base_weight())
        if safe_merge and not bool(torch.isfinite(new).all()):
            raise ValueError(
                f"{self.module_name or self.method}: merging would put NaN/Inf into the base weight; "
                "the adapter's factors are not finite — not merged"
            )
        self._write_weight(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight (exact up to fp rounding)."""
        if not self.merged:
            raise ValueError(f"{self.module_name or self.method}: the adapter is not merged")
        self._write_weight(self._unmerged_weight(self.base_weight()))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


class LoraLayer(AdapterLayer):
    """LoRA: ΔW = s·B A; init ``"default"`` (A Kaiming-uniform a=√5, B = 0) or ``"gaussian"``
    (A ~ N(0, 1/r²), B = 0), as PEFT."""

    method = "lora"
    inits = ("default", "gaussian")

    def __init__(self, base_layer, r, lora_alpha, lora_dropout=0.0, use_rslora=False, name="",
                 init="default", core=None):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, name)
        _check_init(self.method, init, self.inits)
        if core is not None:
            raise ValueError(f"{self.method}: core applies to polar/stella/symlora only, got core={core!r}")
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **self._factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **self._factory))
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / r)

    def delta_factors(self):
        """(s·B, A): ΔW = s·B A with ``lora_B`` (out×r) and ``lora_A`` (r×in)."""
        return self.scaling * self.lora_B, self.lora_A

    def _delta_forward(self, x):
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


class DoraLayer(LoraLayer):
    """DoRA as PEFT: y = (m/‖W + s·BA‖_row) ⊙ (x Wᵀ + s·x (BA)ᵀ) + b, the norm detached;
    m (``lora_magnitude``, length out) starts at the row norms of W, so the start is exact W."""

    method = "dora"

    def __init__(self, base_layer, r, lora_alpha, lora_dropout=0.0, use_rslora=False, name="",
                 init="default", core=None):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, name, init, core)
        self.lora_magnitude = nn.Parameter(self.weight_norm().to(self.adapter_dtype))
        self._merge_scale: Tensor | None = None

    @torch.no_grad()
    def weight_norm(self, w: Tensor | None = None) -> Tensor:
        """‖W + s·B A‖ of each output row, from ‖W_i‖² + 2s⟨W_i, (BA)_i⟩ + s²‖(BA)_i‖²."""
        w = (self.base_weight() if w is None else w).to(self.adapter_dtype)
        b, a = self.delta_factors()
        sq = (w * w).sum(1) + 2.0 * ((w @ a.T) * b).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
        return sq.clamp_min(0.0).sqrt()

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        h = x.to(self.adapter_dtype)
        scale = self.lora_magnitude / self.weight_norm()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = result.to(self.adapter_dtype)
            if self.base_layer.bias is not None:
                base = base - self.base_layer.bias.to(self.adapter_dtype)
        else:
            h = self.lora_dropout(h)
            base = TF.linear(h, self.base_weight().to(self.adapter_dtype))
        extra = (scale - 1.0) * base + scale * self._delta_forward(h)
        return result + extra.to(result.dtype)

    def _merged_weight(self, w):
        w = w.to(self.adapter_dtype)
        self._merge_scale = (self.lora_magnitude / self.weight_norm(w)).detach().clone()
        return self._merge_scale[:, None] * (w + self.delta_weight())

    def _unmerged_weight(self, w):
        scale, self._merge_scale = self._merge_scale, None
        return w.to(self.adapter_dtype) / scale[:, None] - self.delta_weight()


class _CoreLayer(AdapterLayer):
    """ΔW = s·L C Rᵀ with L ∈ St(out, r), R ∈ St(in, r) (tall ``StiefelParameter``s) and a free
    core C, full r×r (``core="full"``) or diagonal (``core="diag"``, stored as a vector)."""

    left = right = core_name = ""
    core_start = 0.0
    inits = ("default", "svd")

    def __init__(self, base_layer, r, lora_alpha, lora_dropout=0.0, use_rslora=False, name="",
                 init="default", core=None):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, name)
        _check_init(self.method, init, self.inits)
        core = "full" if core is None else core
        if core not in ("full", "diag"):
            raise ValueError(f"{self.method}: core must be 'full' or 'diag', got {core!r}")
        self._require_rank(min(self.out_features, self.in_features), "min(out, in)")
        self.core_kind = core
        if init == "svd":
            with torch.no_grad():
                u, _, vh = torch.linalg.svd(self.base_weight().to(torch.float32), full_matrices=False)
            left = StiefelParameter(u[:, :r].to(**self._factory).contiguous())
            right = StiefelParameter(vh[:r].T.to(**self._factory).contiguous())
        else:
            left = StiefelParameter.random(self.out_features, r, **self._factory)
            right = StiefelParameter.random(self.in_features, r, **self._factory)
        setattr(self, self.left, left)
        setattr(self, self.right, right)
        shape = (r, r) if core == "full" else (r,)
        start = torch.full(shape, self.core_start, **self._factory)
        if core == "full":
            start = start * torch.eye(r, **self._factory)
        setattr(self, self.core_name, nn.Parameter(start))

    def _factors(self):
        return getattr(self, self.left), getattr(self, self.core_name), getattr(self, self.right)

    def delta_factors(self):
        """(s·L C, Rᵀ): ΔW = s·L C Rᵀ, the core C applied as a diagonal or a full r×r matrix."""
        lf, c, rf = self._factors()
        b = lf * c if self.core_kind == "diag" else lf @ c
        return self.scaling * b, rf.T

    def _delta_forward(self, x):
        lf, c, rf = self._factors()
        h = x @ rf
        h = h * c if self.core_kind == "diag" else h @ c.T
        return (h @ lf.T) * self.scaling

    def extra_repr(self):
        return super().extra_repr() + f", core={self.core_kind!r}"


class PolarLayer(_CoreLayer):
    """PoLAR: ΔW = s·X Θ Yᵀ; X, Y random orthonormal (or top-r singular vectors of W with
    ``init="svd"``), Θ = 0 (full r×r by default), as the official code."""

    method = "polar"
    left, core_name, right = "X", "theta", "Y"
    core_start = 0.0


class StellaLayer(_CoreLayer):
    """StelLA: ΔW = s·U S Vᵀ; U, V random orthonormal (or from the SVD of W with ``init="svd"``),
    S = I (a non-zero start: the model output changes at init), as the official code."""

    method = "stella"
    left, core_name, right = "U", "S", "V"
    core_start = 1.0


class SymLoraLayer(AdapterLayer):
    """SymLoRA: ΔW = s·Q diag(λ) Qᵀ (``core="diag"``) or s·Q sym(S) Qᵀ (``core="full"``) through
    :class:`~stiefel_opt.manifolds.SharedQSpectral` (``self.spectral``); Q random orthonormal,
    core 0. Square weights only."""

    method = "symlora"
    inits = ("default",)

    def __init__(self, base_layer, r, lora_alpha, lora_dropout=0.0, use_rslora=False, name="",
                 init="default", core=None):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, name)
        _check_init(self.method, init, self.inits)
        if self.in_features != self.out_features:
            raise ValueError(
                f"symlora adapter on {name or 'module'}: Q diag(λ) Qᵀ needs a square weight, got "
                f"(out={self.out_features}, in={self.in_features}); exclude this module or use "
                "method 'polar'/'stella'/'lora' for it"
            )
        self._require_rank(self.in_features, "the weight size")
        self.spectral = SharedQSpectral(self.in_features, r, core="diag" if core is None else core,
                                        init_scale=0.0, **self._factory)
        self.core_kind = self.spectral.core_kind

    def delta_factors(self):
        """(s·Q core, Qᵀ) from :meth:`~stiefel_opt.manifolds.SharedQSpectral.factors`: ΔW = s·Q core Qᵀ."""
        b, a = self.spectral.factors()
        return self.scaling * b, a

    def _delta_forward(self, x):
        return self.spectral(x) * self.scaling

    def extra_repr(self):
        return super().extra_repr() + f", core={self.core_kind!r}"


LAYERS: dict[str, type[AdapterLayer]] = {
    cls.method: cls for cls in (LoraLayer, DoraLayer, PolarLayer, StellaLayer, SymLoraLayer)
}
