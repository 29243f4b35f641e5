"""Shared machinery of the Stiefel optimizers.

- Which parameters are constrained: a param group's ``"manifold"`` (``"stiefel"`` or a
  ``Stiefel``; normalized by :func:`~stiefel_opt.manifolds.as_stiefel` and kept in the group, so
  it survives FSDP2, which drops tensor subclasses), else the parameter's own ``.manifold`` when it
  is a Stiefel manifold (``StiefelParameter``, geoopt ``ManifoldParameter``).
- Euclidean parameters get exactly the ``torch.optim`` twin's update: the twin's own
  ``_init_group`` and functional ``sgd``/``adam`` with the group's flags.
- Manifold parameters of equal matrix shape, dtype, device, metric and retraction are updated as
  one (B, n, p) stack through the step function of :data:`STEP_FUNCTIONS` (the one dispatch point).
  Their optimizer state tensors are views into per-bucket stacked buffers, so a step copies only
  the parameters and gradients in and the parameters out.
- bf16/fp16 manifold parameters keep an fp32 master copy (``state["master"]``) and fp32 moments.
- A non-finite gradient matrix is skipped (``nonfinite="skip"``: a ``RuntimeWarning``, and
  ``state["nonfinite_skips"]`` counts the matrices) or raises (``nonfinite="raise"``).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _use_grad_for_differentiable
from torch.optim.sgd import sgd as _torch_sgd

from .. import distributed as _dist
from .. import functional as F
from .. import kernels as _kernels
from ..manifolds import Stiefel, as_stiefel, is_stiefel

__all__ = ["BACKENDS", "STEP_FUNCTIONS", "step_function", "param_manifold", "stack_matrices", "unstack_into",
           "nonfinite_matrices"]

BACKENDS = ("auto", "torch", "triton")
"""The values of the optimizers' ``backend=`` option: ``"torch"`` (the :mod:`stiefel_opt.functional`
steps), ``"triton"`` (the fused kernels) or ``"auto"`` (Triton for CUDA tensors when it can run)."""

STEP_FUNCTIONS: dict[str, dict[str, Callable]] = {
    "torch": {
        "riemannian_sgd": F.riemannian_sgd_update,
        "riemannian_adam": F.riemannian_adam_update,
        "landing_sgd": F.landing_sgd_update,
        "landing_adam": F.landing_adam_update,
    },
    # fused kernels (stiefel_opt.kernels; triton is imported on their first call only)
    "triton": _kernels.FUSED_STEPS,
}
"""Backend → {step name → batched step function}: ``"torch"`` holds the ``*_update`` functions of
:mod:`stiefel_opt.functional`, ``"triton"`` is :data:`kernels.FUSED_STEPS` (same contracts)."""

_LOW = (torch.float16, torch.bfloat16)
_UNSUPPORTED_ON_MANIFOLD = ("fused", "differentiable", "capturable")


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "auto"  # per call, from the tensors' device and dtype (see step_function)
    if backend not in STEP_FUNCTIONS:
        raise ValueError(
            f"backend={backend!r}: no fused optimizer-step kernels are registered yet; use "
            "backend='torch' or 'auto'"
        )
    return backend


@functools.cache
def _compiled(name: str) -> Callable:
    """``torch.compile`` of the torch step ``name``; lr and step are passed as 0-d tensors, so a new
    value is an input of the compiled graph rather than a recompilation."""
    fn = torch.compile(STEP_FUNCTIONS["torch"][name])

    @functools.wraps(STEP_FUNCTIONS["torch"][name])
    def step(*args, **kwargs):
        for k in ("lr", "step"):
            if k in kwargs:
                kwargs[k] = torch.tensor(float(kwargs[k]))
        return fn(*args, **kwargs)

    return step


def step_function(name: str, backend: str = "auto", compile: bool = False) -> Callable:
    """The batched step function ``name`` for ``backend`` (the optimizers' one dispatch point).

    ``"auto"``: the fused kernel when one is registered for ``name`` and the stack is on CUDA in a
    supported dtype with triton installed, the torch function otherwise (decided per call).
    ``compile``: the torch function through ``torch.compile`` (not with ``backend="triton"``).
    """
    backend = _resolve_backend(backend)
    fused = STEP_FUNCTIONS.get("triton", {}).get(name)
    if compile and backend == "triton":
        raise ValueError("compile=True compiles the torch step; it does not combine with backend='triton'")
    if backend == "auto":
        torch_fn = _compiled(name) if compile else STEP_FUNCTIONS["torch"][name]
        return torch_fn if fused is None else _kernels.auto_dispatch(torch_fn, fused)
    if backend == "triton" and fused is None:
        raise ValueError(
            f"backend='triton': no fused kernel for the {name!r} step yet (fused: "
            f"{sorted(STEP_FUNCTIONS['triton'])}); use backend='torch' or 'auto'"
        )
    return _compiled(name) if compile else STEP_FUNCTIONS[backend][name]


def param_manifold(group: dict, p: Tensor) -> Stiefel | None:
    """The group's manifold, else the parameter's own Stiefel manifold, else None (Euclidean)."""
    m = group.get("manifold")
    if m is not None:
        return m
    pm = getattr(p, "manifold", None)
    return as_stiefel(pm) if pm is not None and is_stiefel(pm) else None


def stack_matrices(tensors: list[Tensor], mshape: tuple, dtype: torch.dtype | None = None) -> Tensor:
    """(B, *mshape) stack of the matrices of ``tensors`` (cast to ``dtype`` when given); plain
    matrices are stacked without reshapes."""
    if len(tensors) == 1:
        stack = tensors[0].reshape(-1, *mshape)
    elif all(t.dim() == 2 for t in tensors):
        stack = torch.stack(tensors)
    else:
        stack = torch.cat([t.reshape(-1, *mshape) for t in tensors])
    return stack if dtype is None else stack.to(dtype)


def unstack_into(dst: list[Tensor], stack: Tensor) -> None:
    """Copy a (B, n, p) stack back into the tensors it was stacked from (cast to their dtype)."""
    if all(t.dim() == 2 for t in dst):
        torch._foreach_copy_(dst, stack.unbind(0))
        return
    counts = [t.numel() // (stack.shape[-2] * stack.shape[-1]) for t in dst]
    torch._foreach_copy_(dst, [c.reshape(t.shape) for c, t in zip(stack.split(counts), dst)])


def nonfinite_matrices(g: Tensor) -> Tensor:
    """(B,) mask of the matrices of a (B, n, p) stack holding a NaN or ±inf (it shows in the max or
    the min: two cheap reductions)."""
    dims = (-2, -1)
    return ~(g.amax(dim=dims).isfinite() & g.amin(dim=dims).isfinite())


def _manifold_spec(m: Stiefel) -> dict:
    return {"manifold": "stiefel", "metric": m.metric, "retraction": m.retraction, "ndim": m.ndim}


class _Bucket:
    """Same-shape manifold parameters updated as one stack of ``sum(counts)`` matrices."""

    __slots__ = ("params", "grads", "states", "counts", "mshape", "manifold", "retraction", "master", "cdtype",
                 "layout")

    def __init__(self, mshape, manifold, retraction, master, cdtype, layout=None):
        self.params: list[Tensor] = []  # local shards of DTensor parameters (see stiefel_opt.distributed)
        self.grads: list[Tensor] = []
        self.layout = layout
        self.states: list[dict] = []
        self.counts: list[int] = []
        self.mshape = mshape
        self.manifold = manifold
        self.retraction = retraction
        self.master = master
        self.cdtype = cdtype

    @property
    def size(self) -> int:
        return sum(self.counts)

    def state_shape(self, i: int, scalar: bool = False) -> tuple:
        """Shape of a per-parameter state entry: the parameter's, or (…lead, 1, 1) for a scalar."""
        p = self.params[i]
        if not scalar:
            return tuple(p.shape)
        lead = p.shape[: p.dim() - self.manifold.ndim]
        return (*lead, 1, 1)

    def stacked(self, key: str, *, scalar: bool = False, init: Callable[[], Tensor] | None = None) -> Tensor | None:
        """The (B, *mshape) buffer whose slices are ``states[i][key]`` (as views of it).

        Reuses the buffer when the entries already are its views in order; otherwise stacks them
        (after load_state_dict or deepcopy, or a change in which parameters have gradients).
        Missing entries are created by ``init`` (None: return None, nothing created).
        """
        mshape = (1, 1) if scalar else self.mshape
        ts = [s.get(key) for s in self.states]
        if all(t is not None for t in ts):
            base = ts[0]._base
            if base is not None and base.dtype == self.cdtype and tuple(base.shape) == (self.size, *mshape) \
                    and base.is_contiguous() and self._views_of(ts, base):
                return base
            buf = torch.cat([t.reshape(-1, *mshape).to(self.cdtype) for t in ts])
        elif init is None:
            return None
        else:
            buf = init()
        self.assign(key, buf, scalar=scalar)
        return buf

    def _views_of(self, ts, base) -> bool:
        step = base.stride(0) * base.element_size()
        ptr, off = base.data_ptr(), 0
        for t, k in zip(ts, self.counts):
            if t._base is not base or t.data_ptr() != ptr + off * step:
                return False
            off += k
        return True

    def assign(self, key: str, buf: Tensor, *, scalar: bool = False) -> None:
        """Store slices of ``buf`` as views in each parameter's state."""
        buf = buf.contiguous()
        off = 0
        for i, (s, k) in enumerate(zip(self.states, self.counts)):
            s[key] = buf[off : off + k].view(self.state_shape(i, scalar))
            off += k

    def zeros(self, scalar: bool = False) -> Tensor:
        mshape = (1, 1) if scalar else self.mshape
        return torch.zeros((self.size, *mshape), dtype=self.cdtype, device=self.params[0].device)

    def gather(self, tensors: list[Tensor]) -> Tensor:
        """(B, *mshape) stack of the matrices of ``tensors`` (parameters or gradients) in cdtype."""
        return stack_matrices(tensors, self.mshape, self.cdtype)

    def scatter(self, stack: Tensor) -> None:
        """Copy the stack back into the parameters (cast to their dtype)."""
        unstack_into(self.params, stack)


class StiefelOptimizer:
    """Mixin for an optimizer that is a ``torch.optim`` twin on Euclidean parameters and a
    Stiefel optimizer on manifold parameters. Subclasses define ``_STEP`` (the step function name),
    ``_EXTRA`` (their own group keys), ``_bucket_tag``, ``_euclidean_step`` and ``_manifold_update``."""

    _STEP: str = ""
    _COMMON = ("manifold", "retraction", "nonfinite", "master_weights", "backend", "compile")
    _EXTRA: tuple[str, ...] = ()
    _SCALAR_KEYS: tuple[str, ...] = ()

    def _setup(self, extra: dict) -> None:
        self._pending_extra = extra

    def _finish_setup(self) -> None:
        self.defaults.update(self.__dict__.pop("_pending_extra"))

    def _extra_defaults(self) -> dict:
        pending = self.__dict__.get("_pending_extra")
        if pending is not None:
            return pending
        return {k: self.defaults[k] for k in self._COMMON + self._EXTRA if k in self.defaults}

    # --- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        for k, v in self._extra_defaults().items():
            param_group.setdefault(k, v)
        param_group["manifold"] = as_stiefel(param_group.get("manifold"))
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict) -> None:
        name = type(self).__name__
        if group["nonfinite"] not in ("skip", "raise"):
            raise ValueError(f"{name}: nonfinite must be 'skip' or 'raise', got {group['nonfinite']!r}")
        if group["master_weights"] not in (None, True, False):
            raise ValueError(f"{name}: master_weights must be None, True or False, got {group['master_weights']!r}")
        _resolve_backend(group["backend"])
        if group["compile"] not in (True, False):
            raise ValueError(f"{name}: compile must be True or False, got {group['compile']!r}")
        if group["compile"] and group["backend"] == "triton":
            raise ValueError(f"{name}: compile=True compiles the torch step; use backend='torch' or 'auto' with it")
        if group["retraction"] is not None and group["retraction"] not in F.RETRACTIONS:
            raise ValueError(
                f"{name}: retraction must be None (the manifold's) or one of {tuple(F.RETRACTIONS)}, "
                f"got {group['retraction']!r}"
            )
        manifold_params = [(i, p) for i, p in enumerate(group["params"]) if param_manifold(group, p) is not None]
        if not manifold_params:
            return
        for flag in _UNSUPPORTED_ON_MANIFOLD:
            if group.get(flag):
                raise ValueError(
                    f"{name}: {flag}=True is not supported for Stiefel parameters; put them in a "
                    f"param group with {flag}=False"
                )
        for i, p in manifold_params:
            m = param_manifold(group, p)
            if p.dim() < max(2, m.ndim) or not p.is_floating_point() or p.is_complex():
                raise ValueError(
                    f"{name}: parameter {i} of a Stiefel param group must be a real floating-point "
                    f"tensor with at least {max(2, m.ndim)} dims (manifold ndim={m.ndim}); got shape "
                    f"{tuple(p.shape)} and dtype {p.dtype}. Move it to a group without 'manifold'."
                )

    # --- step -----------------------------------------------------------------------------------
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One step: the ``torch.optim`` twin on Euclidean parameters, the batched Stiefel update on
        manifold parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            euclidean, manifold = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = param_manifold(group, p)
                if m is None:
                    euclidean.append(p)
                else:
                    manifold.append((p, m))
            if euclidean:
                self._euclidean_step(group, euclidean)
            if manifold:
                with torch.no_grad():
                    self._manifold_step(group, manifold)
        return loss

    def _manifold_step(self, group: dict, items: list) -> None:
        buckets: dict[tuple, _Bucket] = {}
        for p, m in items:
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__}: sparse gradients are not supported on Stiefel "
                                 f"parameters (shape {tuple(p.shape)})")
            retraction = group["retraction"] or m.retraction
            p_loc, g_loc, layout = _dist.local_parts(p, m, self, group, retraction if "riemannian" in self._STEP else None)
            mat = m.to_matrix(p_loc)
            mshape = tuple(mat.shape[-2:])
            state = self.state[p]
            low = p.dtype in _LOW
            master = low and group["master_weights"] is not False
            key = (mshape, p.dtype, p.device, m.metric, retraction, m.ndim, master, self._bucket_tag(group, state),
                   layout)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = _Bucket(mshape, m, retraction, master, torch.float32 if low else p.dtype, layout)
            b.params.append(p_loc)
            b.grads.append(g_loc)
            b.states.append(state)
            b.counts.append(math.prod(p_loc.shape[: p_loc.dim() - m.ndim]))
        fn = step_function(self._STEP, group["backend"], group.get("compile", False))
        for b in buckets.values():
            self._bucket_step(group, b, fn if b.layout is None else
                              _dist.sharded_step(STEP_FUNCTIONS["torch"][self._STEP], b.layout, group["backend"]))

    def _bucket_step(self, group: dict, b: _Bucket, fn: Callable) -> None:
        if b.master:
            x = b.stacked("master", init=lambda: b.gather(b.params))
        else:
            x = b.gather(b.params)
        g = b.gather(b.grads)
        if group["maximize"]:
            g = -g
        bad = _dist.agree(nonfinite_matrices(g), b.layout)
        skipped = None
        if bool(bad.any()):
            skipped, untouched = self._nonfinite(group, b, bad)
            g = g.masked_fill(bad[:, None, None], 0.0)
        stacks = self._state_stacks(group, b)
        saved = None
        if skipped is not None:
            saved = {k: t[skipped].clone() for k, t in stacks.items() if t is not None}
        x_new = self._manifold_update(group, b, fn, x, g, stacks)
        if skipped is not None:
            x_new[skipped] = x[skipped]
            for k, t in saved.items():
                b.stacked(k, scalar=k in self._scalar_keys(group))[skipped] = t
            for s in untouched:  # every matrix of the parameter skipped: its step count stays too
                if "step" in s:
                    s["step"] -= 1
        if b.master:
            x.copy_(x_new)
        b.scatter(x_new)

    def _nonfinite(self, group: dict, b: _Bucket, bad: Tensor) -> Tensor:
        idx = bad.nonzero().squeeze(1)
        where = f"{int(idx.numel())} of {b.size} Stiefel matrices of shape {b.mshape}"
        if group["nonfinite"] == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradient in {where}; pass nonfinite='skip' to skip "
                "such matrices, or fix the loss"
            )
        warnings.warn(
            f"{type(self).__name__}: non-finite gradient in {where}; their update was skipped "
            "(counted in state['nonfinite_skips'])",
            RuntimeWarning,
            stacklevel=4,
        )
        off, whole = 0, []
        for s, k in zip(b.states, b.counts):
            n_bad = int(bad[off : off + k].sum())
            if n_bad:
                s["nonfinite_skips"] = s.get("nonfinite_skips", 0) + n_bad
            if n_bad == k:
                whole.append(s)
            off += k
        return idx, whole

    def _scalar_keys(self, group: dict) -> tuple[str, ...]:
        return self._SCALAR_KEYS if group.get("second_moment") == "scalar" else ()

    # --- state dict -----------------------------------------------------------------------------
    def state_dict(self):
        """torch's state dict, with a group's ``Stiefel`` stored as a plain dict (weights_only-safe)."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            if isinstance(g.get("manifold"), Stiefel):
                g["manifold"] = _manifold_spec(g["manifold"])
        return sd

    def load_state_dict(self, state_dict) -> None:
        """torch's ``load_state_dict``, plus: a state whose tensors do not match the parameters' shapes
        raises ``ValueError``; fp32 masters and moments of bf16/fp16 manifold parameters stay fp32."""
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict["param_groups"]]
        for g in groups:
            spec = g.get("manifold")
            if isinstance(spec, dict):
                spec = dict(spec)
                spec.pop("manifold", None)
                g["manifold"] = Stiefel(**spec)
        state_dict["param_groups"] = groups
        saved_state = state_dict["state"]
        if len(groups) == len(self.param_groups):
            for i, (sg, g) in enumerate(zip(groups, self.param_groups)):
                for sid, p in zip(sg["params"], g["params"]):
                    self._check_loaded_state(i, g, p, saved_state.get(sid, {}))
        super().load_state_dict(state_dict)
        for sg, g in zip(groups, self.param_groups):
            for sid, p in zip(sg["params"], g["params"]):
                if p.dtype in _LOW and param_manifold(g, p) is not None:
                    for k, v in saved_state.get(sid, {}).items():
                        if k != "step" and isinstance(v, Tensor) and v.dtype == torch.float32:
                            self.state[p][k] = v.to(device=p.device)

    def _check_loaded_state(self, gi: int, group: dict, p: Tensor, st: dict) -> None:
        m = param_manifold(group, p)
        for k, v in st.items():
            if k == "step" or not isinstance(v, Tensor):
                continue
            ok = tuple(v.shape) == tuple(p.shape)
            if not ok and m is not None and k in self._SCALAR_KEYS:
                lead = p.shape[: p.dim() - m.ndim]
                ok = tuple(v.shape) == (*lead, 1, 1)
            if not ok:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: state[{k!r}] of a parameter in group {gi} "
                    f"has shape {tuple(v.shape)} but the parameter has shape {tuple(p.shape)}: the state "
                    "dict comes from a different parameter layout; build the optimizer over the same "
                    "parameters in the same order"
                )


class SGDFamily(StiefelOptimizer):
    """Momentum handling shared by RiemannianSGD and LandingSGD (twin: ``torch.optim.SGD``)."""

    def _bucket_tag(self, group: dict, state: dict):
        return "momentum_buffer" in state if group["momentum"] else None

    def _state_stacks(self, group: dict, b: _Bucket) -> dict:
        return {"momentum_buffer": b.stacked("momentum_buffer")} if group["momentum"] else {}

    def _momentum_kwargs(self, group: dict) -> dict:
        return {"lr": float(group["lr"]), "momentum": group["momentum"], "dampening": group["dampening"],
                "nesterov": group["nesterov"]}

    def _finish(self, group: dict, b: _Bucket, stacks: dict, buf: Tensor | None) -> None:
        if group["momentum"] and stacks["momentum_buffer"] is None:
            b.assign("momentum_buffer", buf)

    def _euclidean_step(self, group: dict, params: list[Tensor]) -> None:
        sub = dict(group)
        sub["params"] = params
        ps: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor | None] = []
        has_sparse_grad = torch.optim.SGD._init_group(self, sub, ps, grads, bufs)
        _torch_sgd(
            ps, grads, bufs,
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            has_sparse_grad=has_sparse_grad, foreach=group["foreach"], fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
        )
        if group["momentum"] != 0:
            for p, buf in zip(ps, bufs):
                self.state[p]["momentum_buffer"] = buf


class AdamFamily(StiefelOptimizer):
    """Moment handling shared by RiemannianAdam and LandingAdam (twin: ``torch.optim.Adam``)."""

    _SCALAR_KEYS = ("exp_avg_sq", "max_exp_avg_sq")

    def _bucket_tag(self, group: dict, state: dict):
        return int(state["step"]) if "step" in state else 0

    def _state_stacks(self, group: dict, b: _Bucket) -> dict:
        scalar = group["second_moment"] == "scalar"
        for s in b.states:
            if "step" not in s:
                s["step"] = torch.tensor(0.0, dtype=torch.float32)
        stacks = {
            "exp_avg": b.stacked("exp_avg", init=b.zeros),
            "exp_avg_sq": b.stacked("exp_avg_sq", scalar=scalar, init=lambda: b.zeros(scalar)),
        }
        if group["amsgrad"]:
            stacks["max_exp_avg_sq"] = b.stacked("max_exp_avg_sq", scalar=scalar, init=lambda: b.zeros(scalar))
        return stacks

    def _adam_kwargs(self, group: dict, b: _Bucket) -> dict:
        step = self._bucket_tag(group, b.states[0]) + 1
        torch._foreach_add_([s["step"] for s in b.states], 1.0)
        beta1, beta2 = group["betas"]
        return {"step": step, "lr": float(group["lr"]), "beta1": float(beta1), "beta2": float(beta2),
                "eps": group["eps"], "scalar_v": group["second_moment"] == "scalar"}

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        if group["second_moment"] not in ("elementwise", "scalar"):
            raise ValueError(
                f"{type(self).__name__}: second_moment must be 'elementwise' or 'scalar', got "
                f"{group['second_moment']!r}"
            )

    def _euclidean_step(self, group: dict, params: list[Tensor]) -> None:
        self._accelerator_graph_capture_health_check()
        sub = dict(group)
        sub["params"] = params
        ps: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        steps: list[Tensor] = []
        has_complex = torch.optim.Adam._init_group(self, sub, ps, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        beta1, beta2 = group["betas"]
        _torch_adam(
            ps, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
            fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None), decoupled_weight_decay=group["decoupled_weight_decay"],
        )
