"""The built-in adapter methods, registered with :func:`~stiefel_opt.adapters.register_adapter`
as any other (the contract and the registry are in :mod:`.base`). Each wraps a frozen
``nn.Linear`` or transformers ``Conv1D``.

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
from .base import LAYERS, AdapterLayer, is_conv1d, register_adapter

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


@register_adapter
class LoraLayer(AdapterLayer):
    """LoRA: ΔW = s·B A; init ``"default"`` (A Kaiming-uniform a=√5, B = 0) or ``"gaussian"``
    (A ~ N(0, 1/r²), B = 0), as PEFT."""

    method = "lora"
    inits = ("default", "gaussian")

    def __init__(self, base_layer, r, lora_alpha, lora_dropout=0.0, use_rslora=False, name="",
                 init="default", core=None):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, name, init, core)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **self.factory_kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **self.factory_kwargs))
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / r)

    def delta_factors(self):
        """(s·B, A): ΔW = s·B A with ``lora_B`` (out×r) and ``lora_A`` (r×in)."""
        return self.scaling * self.lora_B, self.lora_A

    def delta_forward(self, x):
        """x ↦ s·(x Aᵀ) Bᵀ."""
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


@register_adapter
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
        extra = (scale - 1.0) * base + scale * self.delta_forward(h)
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
    cores = ("full", "diag")
    default_core = "full"

    def __init__(self, base_layer, r, lora_alpha, lora_dropout=0.0, use_rslora=False, name="",
                 init="default", core=None):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, name, init, core)
        self.require_rank(min(self.out_features, self.in_features), "min(out, in)")
        core = self.core_kind
        if init == "svd":
            with torch.no_grad():
                u, _, vh = torch.linalg.svd(self.base_weight().to(torch.float32), full_matrices=False)
            left = StiefelParameter(u[:, :r].to(**self.factory_kwargs).contiguous())
            right = StiefelParameter(vh[:r].T.to(**self.factory_kwargs).contiguous())
        else:
            left = StiefelParameter.random(self.out_features, r, **self.factory_kwargs)
            right = StiefelParameter.random(self.in_features, r, **self.factory_kwargs)
        setattr(self, self.left, left)
        setattr(self, self.right, right)
        shape = (r, r) if core == "full" else (r,)
        start = torch.full(shape, self.core_start, **self.factory_kwargs)
        if core == "full":
            start = start * torch.eye(r, **self.factory_kwargs)
        setattr(self, self.core_name, nn.Parameter(start))

    def _factors(self):
        return getattr(self, self.left), getattr(self, self.core_name), getattr(self, self.right)

    def delta_factors(self):
        """(s·L C, Rᵀ): ΔW = s·L C Rᵀ, the core C applied as a diagonal or a full r×r matrix."""
        lf, c, rf = self._factors()
        b = lf * c if self.core_kind == "diag" else lf @ c
        return self.scaling * b, rf.T

    def delta_forward(self, x):
        """x ↦ s·((x R) Cᵀ) Lᵀ."""
        lf, c, rf = self._factors()
        h = x @ rf
        h = h * c if self.core_kind == "diag" else h @ c.T
        return (h @ lf.T) * self.scaling

    def extra_repr(self):
        return super().extra_repr() + f", core={self.core_kind!r}"


@register_adapter
class PolarLayer(_CoreLayer):
    """PoLAR: ΔW = s·X Θ Yᵀ; X, Y random orthonormal (or top-r singular vectors of W with
    ``init="svd"``), Θ = 0 (full r×r by default), as the official code."""

    method = "polar"
    left, core_name, right = "X", "theta", "Y"
    core_start = 0.0


@register_adapter
class StellaLayer(_CoreLayer):
    """StelLA: ΔW = s·U S Vᵀ; U, V random orthonormal (or from the SVD of W with ``init="svd"``),
    S = I (a non-zero start: the model output changes at init), as the official code."""

    method = "stella"
    left, core_name, right = "U", "S", "V"
    core_start = 1.0


@register_adapter
class SymLoraLayer(AdapterLayer):
    """SymLoRA: ΔW = s·Q diag(λ) Qᵀ (``core="diag"``) or s·Q sym(S) Qᵀ (``core="full"``) through
    :class:`~stiefel_opt.manifolds.SharedQSpectral` (``self.spectral``); Q random orthonormal,
    core 0. Square weights only."""

    method = "symlora"
    cores = ("full", "diag")
    default_core = "diag"

    def __init__(self, base_layer, r, lora_alpha, lora_dropout=0.0, use_rslora=False, name="",
                 init="default", core=None):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, name, init, core)
        if self.in_features != self.out_features:
            raise ValueError(
                f"symlora adapter on {name or 'module'}: Q diag(λ) Qᵀ needs a square weight, got "
                f"(out={self.out_features}, in={self.in_features}); exclude this module or use "
                "method 'polar'/'stella'/'lora' for it"
            )
        self.require_rank(self.in_features, "the weight size")
        self.spectral = SharedQSpectral(self.in_features, r, core=self.core_kind,
                                        init_scale=0.0, **self.factory_kwargs)

    def delta_factors(self):
        """(s·Q core, Qᵀ) from :meth:`~stiefel_opt.manifolds.SharedQSpectral.factors`: ΔW = s·Q core Qᵀ."""
        b, a = self.spectral.factors()
        return self.scaling * b, a

    def delta_forward(self, x):
        """x ↦ s·x Q core Qᵀ."""
        return self.spectral(x) * self.scaling

    def extra_repr(self):
        return super().extra_repr() + f", core={self.core_kind!r}"

