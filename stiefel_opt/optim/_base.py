"""The package's optimizers on the batching engine (:mod:`._engine`): a ``torch.optim`` twin on
Euclidean parameters, a transactional manifold step on the others.

- Which parameters are constrained: a param group's ``"manifold"`` (a name or a
  :class:`~stiefel_opt.manifolds.MatrixManifold`, normalized by
  :func:`~stiefel_opt.manifolds.as_manifold` and kept in the group, so it survives FSDP2, which
  drops tensor subclasses), else the parameter's own manifold (:func:`._engine.param_manifold`).
- Euclidean parameters get exactly the ``torch.optim`` twin's update: the twin's own
  ``_init_group`` and functional ``sgd``/``adam`` with the group's flags.
- Manifold parameters are stepped per engine :class:`._engine.Bucket` by the batched step the
  subclass names (``_STEP``): a direction rule (:class:`SGDFamily`: momentum; :class:`AdamFamily`:
  moments) composed with a geometry update (retract-and-transport or land) in
  :mod:`stiefel_opt.functional`. bf16/fp16 parameters keep an fp32 master (``state["master"]``).
- A step is all-or-nothing per matrix: every bucket of every group is computed first (state
  updated in place after a backup, rolled back if anything fails), non-finite inputs are masked
  and skipped (``nonfinite="skip"``, counted in ``state["nonfinite_skips"]``) or raise
  (``"raise"``), and only then are parameters written and Euclidean parameters stepped.
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
from ..manifolds import MatrixManifold, as_manifold, is_matrix_manifold, manifold_from_spec
from ._engine import (STEP_FUNCTIONS, Bucket, check_backend, compute_dtype, geometry_key, is_foreign,
                      nonfinite_matrices, nonfinite_message, param_manifold, step_function)
from ._foreign import check_foreign, foreign_updates

__all__ = ["StiefelOptimizer", "PackageOptions", "SGDFamily", "AdamFamily", "plain_manifolds"]

_UNSUPPORTED_ON_MANIFOLD = ("fused", "differentiable", "capturable")

#: Smallest state stack (entries) whose rollback backup is copied into a buffer kept across steps
#: (CPU only, :meth:`StiefelOptimizer._backup`); smaller ones are cloned.
_BACKUP_REUSE_MIN = 1 << 16


def _ensure_finite_points(x: Tensor, bad: Tensor) -> Tensor:
    """``x`` with the matrices selected by ``bad`` replaced by a fixed orthonormal point (their update is
    discarded; this keeps a NaN matrix from failing a batched factorization of the others)."""
    n, p = x.shape[-2:]
    point = torch.eye(n, p, dtype=x.dtype, device=x.device)
    return torch.where(bad[:, None, None], point, x)


class PackageOptions(torch.optim.Optimizer):
    """The optimizers' full ``defaults``: placed right after the torch twin in their bases, it receives
    the defaults the twin built and adds the package's options, which the optimizer's ``__init__`` set
    as ``self.defaults`` before calling the twin — so torch's ``add_param_group`` fills every group
    with all of them, the twin's keys and the package's alike."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, {**defaults, **self.defaults})


class StiefelOptimizer:
    """Mixin for an optimizer that is a ``torch.optim`` twin on Euclidean parameters and a
    Stiefel optimizer on manifold parameters. Subclasses define ``_STEP`` (the step function name; its direction
    rule ``_RULE`` comes from the family, its geometry update ``_UPDATE`` is "retract" or "land"),
    ``_bucket_tag``, ``_euclidean_step`` and ``_manifold_update``, and list :class:`PackageOptions` after
    their torch twin in their bases.

    A step is all-or-nothing per matrix: every manifold update of every group is computed on copies
    of the state first; matrices whose gradient, point or result (new point or new state) is not
    finite are skipped (``nonfinite="skip"``) or the step raises (``"raise"``) — in both cases
    before anything of them is written. Euclidean parameters step only after that.
    """

    _STEP: str = ""
    _RULE: str = ""  # the direction rule: "sgd" (momentum) or "adam" (moments); set by the family
    _UPDATE: str = "retract"  # the geometry update: "retract" (retract and transport) or "land" (safe step)
    _SCALAR_KEYS: tuple[str, ...] = ()
    _STATE_KEYS: tuple[str, ...] = ()  # what a parameter's state may hold besides master/nonfinite_skips
    # state a non-finite value of which need not show in X⁺: checked besides X⁺ after each update. A
    # momentum buffer or first moment enters the direction, so a NaN/inf in it shows in X⁺; an
    # overflowing second moment only zeroes the direction (m/√v) and must be checked itself.
    _UNSEEN_STATE: tuple[str, ...] = ()
    _POINT_SET = False  # True: any geoopt Stiefel parameter is stepped as ours (see param_manifold)

    def _manifold_of(self, group: dict, p: Tensor):
        return param_manifold(group, p, self._POINT_SET)

    # --- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group["manifold"] = as_manifold(param_group.get("manifold", self.defaults["manifold"]))
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    def _check_options(self, group: dict) -> None:
        """The group's option values (not its parameters); run at construction, at load and on
        every step of a group holding manifold parameters (a ``param_groups`` edit is caught)."""
        name = type(self).__name__
        if group["nonfinite"] not in ("skip", "raise"):
            raise ValueError(f"{name}: nonfinite must be 'skip' or 'raise', got {group['nonfinite']!r}")
        if group["master_weights"] not in (None, True, False):
            raise ValueError(f"{name}: master_weights must be None, True or False, got {group['master_weights']!r}")
        check_backend(group["backend"])
        if group["compile"] not in (True, False):
            raise ValueError(f"{name}: compile must be True or False, got {group['compile']!r}")
        if group["compile"] and group["backend"] == "triton":
            raise ValueError(f"{name}: compile=True compiles the torch step; use backend='torch' or 'auto' with it")
        if group["retraction"] is not None and group["retraction"] not in F.RETRACTIONS:
            raise ValueError(
                f"{name}: retraction must be None (the manifold's) or one of {tuple(F.RETRACTIONS)}, "
                f"got {group['retraction']!r}"
            )
        m = group["manifold"]
        if m is not None and not is_matrix_manifold(m):
            raise ValueError(f"{name}: a param group's manifold must be None, a manifold name or a MatrixManifold "
                             f"(Stiefel, Oblique), got {m!r}")
        lr = float(group["lr"])
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"{name}: Invalid learning rate: {group['lr']} (must be finite and >= 0)")

    def _check_manifold_options(self, group: dict) -> None:
        for flag in _UNSUPPORTED_ON_MANIFOLD:
            if group.get(flag):
                raise ValueError(
                    f"{type(self).__name__}: {flag}=True is not supported for Stiefel parameters; put them in a "
                    f"param group with {flag}=False"
                )

    def _check_group(self, group: dict) -> None:
        self._check_options(group)
        name = type(self).__name__
        manifold_params = [(i, p) for i, p in enumerate(group["params"]) if self._manifold_of(group, p) is not None]
        if not manifold_params:
            return
        self._check_manifold_options(group)
        for i, p in manifold_params:
            m = self._manifold_of(group, p)
            if is_foreign(m):
                check_foreign(self, group, i, p)
                continue
            if p.dim() < max(2, m.ndim) or not p.is_floating_point() or p.is_complex():
                raise ValueError(
                    f"{name}: parameter {i} of a Stiefel param group must be a real floating-point "
                    f"tensor with at least {max(2, m.ndim)} dims (manifold ndim={m.ndim}); got shape "
                    f"{tuple(p.shape)} and dtype {p.dtype}. Move it to a group without 'manifold'."
                )
            if p.numel() == 0:
                raise ValueError(
                    f"{name}: parameter {i} of a Stiefel param group has shape {tuple(p.shape)} with no "
                    "entries: an empty matrix has no orthonormal frame. Move it to a group without 'manifold'."
                )

    # --- step -----------------------------------------------------------------------------------
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """One step: the batched Stiefel updates of every group are computed first and written only
        when all succeeded; then the ``torch.optim`` twin's update on Euclidean parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = []
        for gi, group in enumerate(self.param_groups):
            euclidean, manifold = [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                m = self._manifold_of(group, p)
                if m is None:
                    euclidean.append(p)
                else:
                    manifold.append((i, p, m))
            plan.append((gi, group, euclidean, manifold))
        rollbacks: list[Callable[[], None]] = []
        self.__dict__["_backups_taken"] = []
        try:
            try:
                with torch.no_grad():
                    commits = [c for gi, group, _, manifold in plan if manifold
                               for c in self._manifold_updates(gi, group, manifold, rollbacks)]
                for _, group, euclidean, manifold in plan:
                    if euclidean:
                        self._euclidean_step(group, euclidean, whole_group=not manifold)
            except BaseException:
                with torch.no_grad():
                    for undo in reversed(rollbacks):
                        undo()
                raise
            with torch.no_grad():
                for commit in commits:
                    commit()
        finally:
            self._release_backups()
        return loss

    def _backup(self, t: Tensor) -> Tensor:
        """A copy of the state stack ``t`` for the rollback. On CPU, for stacks of at least
        :data:`_BACKUP_REUSE_MIN` entries, into a buffer the optimizer keeps from step to step (a
        fresh large CPU buffer page-faults on every step: measured 2-6× the cost of the copy); else a
        clone. The buffers of a step go back to the pool when it ends (:meth:`_release_backups`)."""
        if t.device.type != "cpu" or t.numel() < _BACKUP_REUSE_MIN:
            return t.clone()
        key = (tuple(t.shape), t.dtype)
        free = self.__dict__.setdefault("_backup_pool", {}).get(key)
        buf = free.pop() if free else torch.empty(t.shape, dtype=t.dtype)
        self.__dict__["_backups_taken"].append((key, buf))
        return buf.copy_(t)

    def _release_backups(self) -> None:
        """The step's backup buffers become the pool (only those: a pool never outgrows one step's
        backups, i.e. the moment stacks of one step)."""
        pool: dict = {}
        for key, buf in self.__dict__.pop("_backups_taken", []):
            pool.setdefault(key, []).append(buf)
        self.__dict__["_backup_pool"] = pool

    def _manifold_updates(self, gi: int, group: dict, items: list, rollbacks: list) -> list[Callable[[], None]]:
        """The group's bucket updates, computed but not published: one commit callable per bucket
        (the in-place state updates register their undo on ``rollbacks``)."""
        self._check_options(group)
        self._check_manifold_options(group)
        foreign, items = foreign_updates(self, gi, group, items)
        buckets: dict[tuple, Bucket] = {}
        for i, p, m in items:
            where = functools.partial("parameter {} of param group {} (shape {})".format, i, gi, tuple(p.shape))
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__}: sparse gradients are not supported on Stiefel "
                                 f"parameters ({where()})")
            if p.numel() == 0:
                raise ValueError(f"{type(self).__name__}: {where()} has no entries; an empty matrix has no "
                                 "orthonormal frame")
            retraction = group["retraction"] or m.retraction
            p_loc, g_loc, layout = _dist.local_parts(p, m, self, group, retraction if self._UPDATE == "retract" else None)
            matrices = m.matrix_shape(p_loc.shape)
            mshape = tuple(matrices[-2:])
            state = self.state.get(p)  # (a defaultdict: a lookup must not create the entry)
            if state is None:
                state = {}
            master = p.dtype in F._LOW_PRECISION and group["master_weights"] is not False
            key = (mshape, p.dtype, p.device, geometry_key(m), retraction, master, self._bucket_tag(group, state),
                   layout)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(m, mshape, compute_dtype(p.dtype), layout=layout, retraction=retraction,
                                          master=master)
            b.add(p, p_loc, g_loc, state, where, matrices)
        return foreign + [self._bucket_update(group, b, self._step_function(group, b), rollbacks)
                          for b in buckets.values()]

    def _step_function(self, group: dict, b: Bucket) -> Callable:
        """The bucket's batched step, resolved once (backend, compile, shard layout)."""
        if b.layout is not None:
            return _dist.sharded_step(STEP_FUNCTIONS["torch"][self._STEP], b.layout, group["backend"])
        return step_function(self._STEP, group["backend"], group["compile"], like=b.params[0])

    def _bucket_update(self, group: dict, b: Bucket, fn: Callable, rollbacks: list) -> Callable[[], None]:
        """Compute one bucket's update and return the commit that publishes it.

        The moments are updated in place in the states' own buffers, after a backup of them (pushed
        on ``rollbacks``, which restores them if this or any later part of the step fails). The
        optimistic pass checks only the results (new point and state); when one is not finite, or a
        factorization failed, the state is restored and the matrices whose gradient or point is not
        finite are masked out for a second pass; what is still bad is skipped (rows restored) or
        raises."""
        x = b.stacked("master", init=lambda: b.stack(b.params)) if b.master else b.stack(b.params)
        g = b.stack(b.grads)
        if group["maximize"]:
            g = -g
        stacks = self._state_stacks(group, b)
        backup = {k: self._backup(t) for k, t in stacks.items() if t is not None}

        def rollback():
            for k, t in backup.items():
                stacks[k].copy_(t)

        rollbacks.append(rollback)
        x_new, bad = self._attempt(group, b, fn, x, g, stacks)
        if bad is None:
            any_bad, any_stalled = True, False
        elif self._may_stall(b):  # (whole matrices: no shards to agree with)
            unmoved = self._unmoved(x, x_new)
            any_bad = any_stalled = bool((bad | unmoved).any())  # the one host sync
            if any_bad:  # tell the two apart
                stalled = unmoved & ~bad
                any_bad, any_stalled = torch.stack([bad.any(), stalled.any()]).tolist()
        else:
            bad = _dist.agree(bad, b.layout)
            any_bad, any_stalled = bool(bad.any()), False
        failed = bad is None
        if any_bad:
            rollback()
            bad_grad = nonfinite_matrices(g)
            bad_in = bad_grad | nonfinite_matrices(x)
            for t in stacks.values():
                if t is not None:
                    bad_in |= nonfinite_matrices(t)  # a state corrupted since the last step
            bad_in = _dist.agree(bad_in, b.layout)
            x_new, bad = x, None
            if bool(bad_in.any()):  # mask the bad inputs out and try the others again
                for t in stacks.values():
                    if t is not None:
                        t[bad_in] = 0.0  # their rows are restored from the backup below
                x_new, bad = self._attempt(group, b, fn, _ensure_finite_points(x, bad_in),
                                           g.masked_fill(bad_in[:, None, None], 0.0), stacks)
            if bad is None:  # a factorization fails on finite input: the whole bucket
                rollback()
                bad, x_new = torch.ones_like(bad_in), x
            bad = _dist.agree(bad | bad_in, b.layout)
            self._report_nonfinite(group, b, bad, bad_grad, failed)
            x_new = torch.where(bad[:, None, None], x, x_new)
            for k, t in stacks.items():
                if t is not None:
                    t[bad] = backup[k][bad] if k in backup else 0.0
            stalled = self._stalled(b, x, x_new, bad)
            any_stalled = bool(stalled.any())
        if any_stalled:
            x_new = self._land_from_outside(group, b, x, x_new, stalled)
        skips = b.per_param(bad) if any_bad else [0] * len(b.states)
        return functools.partial(self._commit, group, b, x, x_new, stacks, skips)

    def _attempt(self, group: dict, b: Bucket, fn: Callable, x: Tensor, g: Tensor, stacks: dict):
        """(X⁺, (B,) mask of non-finite results), or (x, None) when a factorization failed."""
        try:
            x_new = self._manifold_update(group, b, fn, x, g, stacks)
        except torch.linalg.LinAlgError:
            return x, None
        total = x_new.sum(dim=(-2, -1))
        for k in self._UNSEEN_STATE:
            if stacks.get(k) is not None:
                total.add_(stacks[k].sum(dim=(-2, -1)))
        return x_new, total.isfinite().logical_not_()

    def _may_stall(self, b: Bucket) -> bool:
        """Whether the bucket's step can leave a matrix exactly in place for good: a landing step on
        whole matrices (η* = 0 outside the landing region); a retraction always moves or is skipped."""
        return self._UPDATE == "land" and b.layout is None

    @staticmethod
    def _unmoved(x: Tensor, x_new: Tensor) -> Tensor:
        """(B,) mask of the matrices whose first row did not move (a zero step moves no row; a false
        alarm only costs a check of d)."""
        return (x_new[:, 0] == x[:, 0]).all(-1)

    def _stalled(self, b: Bucket, x: Tensor, x_new: Tensor, bad: Tensor) -> Tensor:
        """(B,) mask of the good matrices a landing step may have left exactly in place (none where
        :meth:`_may_stall` is False): :meth:`_unmoved` ones."""
        if not self._may_stall(b):
            return torch.zeros_like(bad)
        return self._unmoved(x, x_new) & ~bad

    def _land_from_outside(self, group: dict, b: Bucket, x: Tensor, x_new: Tensor, stalled: Tensor) -> Tensor:
        """A matrix with d = ‖XᵀX − I‖_F ≥ 1 gets a zero safe step forever (η* = 0 there): project it
        onto the manifold (polar factor) with a warning instead of leaving it stuck."""
        far = stalled & (F.infeasibility(x) >= 1.0)
        idx = far.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x_new
        d = F.infeasibility(x[idx])
        warnings.warn(
            f"{type(self).__name__}: {b.describe(far)} lay outside the landing region "
            f"(‖XᵀX − I‖_F up to {float(d.max()):.3g} ≥ 1, where the safe step is 0); projected onto the "
            "manifold (nearest orthonormal matrix). Start from a point with ‖XᵀX − I‖_F < safe_eps.",
            RuntimeWarning,
            stacklevel=5,
        )
        x_new = x_new.clone()
        x_new[idx] = F.project(x[idx]).to(x_new.dtype)
        return x_new

    def _report_nonfinite(self, group: dict, b: Bucket, bad: Tensor, bad_grad: Tensor, failed: bool) -> None:
        what = "non-finite gradient"
        if not bool((bad == bad_grad).all()):
            what += ", parameter, state or update"
        if failed:
            what += " (a factorization failed)"
        message = nonfinite_message(type(self).__name__, what, b.describe(bad), group["nonfinite"])
        if group["nonfinite"] == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=5)

    def _commit(self, group: dict, b: Bucket, x: Tensor, x_new: Tensor, stacks: dict, skips: list[int]) -> None:
        """Publish a computed bucket update: new state buffers (ones the states do not view yet), fp32
        masters, parameters, counters."""
        scalar = self._scalar_keys(group)
        for k, t in stacks.items():
            if t is not None and not b.viewed(k, t):
                b.assign(k, t, scalar=k in scalar)
        if b.master:
            if b.viewed("master", x):
                x.copy_(x_new)
            else:
                b.assign("master", x_new)
        b.unstack_into(b.params, x_new)
        for s, n_bad in zip(b.states, skips):
            if n_bad:
                s["nonfinite_skips"] = s.get("nonfinite_skips", 0) + n_bad
        self._advance(b, skips)
        for p, s in zip(b.owners, b.states):
            if s and p not in self.state:
                self.state[p] = s

    def _advance(self, b: Bucket, skips: list[int]) -> None:
        """Per-parameter counters after a committed step (Adam: the step count)."""

    def _scalar_keys(self, group: dict) -> tuple[str, ...]:
        return self._SCALAR_KEYS if group.get("second_moment") == "scalar" else ()

    # --- landing exactly ------------------------------------------------------------------------
    def project_(self) -> float:
        """Land exactly (e.g. once, after the last step): every Stiefel matrix — group-declared or
        carried by the parameter, batched, the fp32 master of a bf16/fp16 parameter (the parameter then
        set from it) — becomes its nearest orthonormal matrix, the polar factor Y
        (:func:`~stiefel_opt.functional.project`), and ``exp_avg``/``momentum_buffer`` become
        P_Y(M) (:func:`~stiefel_opt.functional.proj_tangent`), so training can go on from there. All
        matrices are computed before any is written; a rank-deficient one raises ``ValueError`` naming
        its parameter. Returns the largest ‖XᵀX − I‖_F before the projection (0.0 if none), to log."""
        from ._project import project_stiefel_
        return project_stiefel_(self, self._manifold_of, ("exp_avg", "momentum_buffer"))

    # --- state dict -----------------------------------------------------------------------------
    def state_dict(self):
        """torch's state dict, with a group's ``Stiefel`` stored as a plain dict (weights_only-safe);
        the conversion runs before any user state_dict post-hook."""
        handle = self.register_state_dict_post_hook(plain_manifolds, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict) -> None:
        """torch's ``load_state_dict``; after every user pre-hook (which may repair the dict), the
        loaded dict is adopted by :meth:`_adopt_state_dict` — groups completed from the current
        ones and validated, state checked — or refused with a ``ValueError`` before anything is
        loaded. fp32 masters and moments of bf16/fp16 manifold parameters stay fp32."""
        adopted = {}

        def adopt(_, sd):
            adopted["sd"] = self._adopt_state_dict(sd)
            return adopted["sd"]

        handle = self.register_load_state_dict_pre_hook(adopt)  # the last pre-hook
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        sd = adopted["sd"]
        for sg, g in zip(sd["param_groups"], self.param_groups):
            for sid, p in zip(sg["params"], g["params"]):
                if p.dtype in F._LOW_PRECISION and self._manifold_of(g, p) is not None:
                    for k, v in sd["state"].get(sid, {}).items():
                        if k != "step" and isinstance(v, Tensor) and v.dtype == torch.float32:
                            self.state[p][k] = v.to(device=p.device)

    def _adopt_state_dict(self, state_dict: dict) -> dict:
        """A loaded state dict made this optimizer's, or ``ValueError`` naming the group/parameter.

        A group's missing keys come from the current group (a ``torch.optim.Adam`` checkpoint keeps
        the declared manifold and the package's options); a saved manifold must equal the declared
        one; every group passes the construction checks; each parameter's state must have this
        optimizer's keys, the parameter's shape and finite values (second moments ≥ 0)."""
        name = f"{type(self).__name__}.load_state_dict"
        state_dict = dict(state_dict)
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            return state_dict  # torch's own error
        groups = []
        for gi, (sg, cg) in enumerate(zip(saved_groups, self.param_groups)):
            sg = dict(sg)
            if "manifold" in sg:
                saved = manifold_from_spec(sg["manifold"], f"{name}: param group {gi}")
                if _spec_or_none(saved) != _spec_or_none(cg["manifold"]):
                    raise ValueError(
                        f"{name}: param group {gi} was saved with manifold {saved!r} but is declared with "
                        f"{cg['manifold']!r}; declare the same manifold, or drop 'manifold' from the saved group"
                    )
            for k, v in cg.items():
                if k not in ("params", "param_names"):
                    sg.setdefault(k, v)
            sg["manifold"] = cg["manifold"]
            if len(sg["params"]) == len(cg["params"]):
                try:
                    self._check_group({**sg, "params": cg["params"]})
                except ValueError as err:
                    raise ValueError(f"{name}: param group {gi}: {err}") from None
                for i, (sid, p) in enumerate(zip(sg["params"], cg["params"])):
                    self._check_loaded_state(f"parameter {i} of param group {gi}", sg, p,
                                             state_dict["state"].get(sid, {}))
            groups.append(sg)
        state_dict["param_groups"] = groups
        return state_dict

    def _check_loaded_state(self, where: str, group: dict, p: Tensor, st: dict) -> None:
        name = f"{type(self).__name__}.load_state_dict"
        m = self._manifold_of(group, p)
        if st:
            keys = set(st)
            unknown = keys - set(self._STATE_KEYS) - {"master", "nonfinite_skips"}
            missing = set(self._required_state(group)) - keys
            if unknown or missing:
                raise ValueError(
                    f"{name}: the state of {where} has keys {sorted(keys)}; {type(self).__name__} "
                    f"{'does not use ' + str(sorted(unknown)) if unknown else 'needs ' + str(sorted(missing))}: "
                    "the state dict comes from another optimizer. Load it into the optimizer that saved it, "
                    "or load only its param_groups (state={})"
                )
        for k, v in st.items():
            if k == "step" or not isinstance(v, Tensor):
                continue
            ok = tuple(v.shape) == tuple(p.shape)
            if not ok and isinstance(m, MatrixManifold) and k in self._SCALAR_KEYS:
                ok = tuple(v.shape) == (*m.matrix_shape(p.shape)[:-2], 1, 1)
            if not ok:
                raise ValueError(
                    f"{name}: state[{k!r}] of {where} has shape {tuple(v.shape)} but the parameter has shape "
                    f"{tuple(p.shape)}: the state dict comes from a different parameter layout; build the "
                    "optimizer over the same parameters in the same order"
                )
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}: state[{k!r}] of {where} holds NaN or ±inf: the checkpoint is corrupt")
            if k in self._SCALAR_KEYS and bool((v < 0).any()):
                raise ValueError(f"{name}: state[{k!r}] of {where} has negative entries (a second moment "
                                 "is ≥ 0): the checkpoint is corrupt")

    def _required_state(self, group: dict) -> tuple[str, ...]:
        """Keys a non-empty state of a parameter of ``group`` must hold."""
        return ()


def plain_manifolds(_, state_dict: dict) -> dict:
    """state_dict post-hook: each group's manifold as its plain dict spec (loads with weights_only)."""
    for g in state_dict["param_groups"]:
        if isinstance(g.get("manifold"), MatrixManifold):
            g["manifold"] = g["manifold"].spec()
    return state_dict


def _spec_or_none(m: MatrixManifold | None) -> dict | None:
    return None if m is None else m.spec()


class SGDFamily(StiefelOptimizer):
    """Momentum handling shared by RiemannianSGD and LandingSGD (twin: ``torch.optim.SGD``)."""

    _RULE = "sgd"
    _STATE_KEYS = ("momentum_buffer",)

    def _bucket_tag(self, group: dict, state: dict):
        return "momentum_buffer" in state if group["momentum"] else None

    def _state_stacks(self, group: dict, b: Bucket) -> dict:
        return {"momentum_buffer": b.stacked("momentum_buffer")} if group["momentum"] else {}

    def _momentum_kwargs(self, group: dict) -> dict:
        return {"lr": float(group["lr"]), "momentum": group["momentum"], "dampening": group["dampening"],
                "nesterov": group["nesterov"]}

    def _finish(self, group: dict, b: Bucket, stacks: dict, buf: Tensor | None) -> None:
        """Keep the momentum buffer a step created (first step) among the stacks to commit."""
        if group["momentum"]:
            stacks["momentum_buffer"] = buf

    def _euclidean_step(self, group: dict, params: list[Tensor], whole_group: bool = False) -> None:
        sub = group if whole_group else {**group, "params": params}
        ps: list[Tensor] = []
        grads: list[Tensor] = []
        bufs: list[Tensor | None] = []
        has_sparse_grad = self._init_group(sub, ps, grads, bufs)
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

    _RULE = "adam"
    _SCALAR_KEYS = ("exp_avg_sq", "max_exp_avg_sq")
    _STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _UNSEEN_STATE = ("exp_avg_sq", "max_exp_avg_sq")

    def _bucket_tag(self, group: dict, state: dict):
        return int(state["step"]) if "step" in state else 0

    def _required_state(self, group: dict) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else \
            ("step", "exp_avg", "exp_avg_sq")

    def _state_stacks(self, group: dict, b: Bucket) -> dict:
        scalar = group["second_moment"] == "scalar"
        stacks = {
            "exp_avg": b.stacked("exp_avg", init=b.zeros),
            "exp_avg_sq": b.stacked("exp_avg_sq", scalar=scalar, init=lambda: b.zeros(scalar)),
        }
        if group["amsgrad"]:
            stacks["max_exp_avg_sq"] = b.stacked("max_exp_avg_sq", scalar=scalar, init=lambda: b.zeros(scalar))
        return stacks

    def _adam_kwargs(self, group: dict, b: Bucket) -> dict:
        """The step function's Adam arguments; the step count it uses is the committed count + 1."""
        beta1, beta2 = group["betas"]
        return {"step": self._bucket_tag(group, b.states[0]) + 1, "lr": float(group["lr"]), "beta1": float(beta1),
                "beta2": float(beta2), "eps": group["eps"], "scalar_v": group["second_moment"] == "scalar"}

    def _advance(self, b: Bucket, skips: list[int]) -> None:
        for s in b.states:
            if "step" not in s:
                s["step"] = torch.tensor(0.0, dtype=torch.float32)
        moved = [s["step"] for s, n_bad, k in zip(b.states, skips, b.counts) if n_bad < k]
        if moved:
            torch._foreach_add_(moved, 1.0)

    def _check_options(self, group: dict) -> None:
        super()._check_options(group)
        name = type(self).__name__
        if group["second_moment"] not in ("elementwise", "scalar"):
            raise ValueError(f"{name}: second_moment must be 'elementwise' or 'scalar', got {group['second_moment']!r}")
        for i, beta in enumerate(group["betas"]):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"{name}: Invalid beta parameter at index {i}: {beta} (must lie in [0, 1))")
        if not 0.0 <= float(group["eps"]) < math.inf:
            raise ValueError(f"{name}: Invalid epsilon value: {group['eps']} (must be finite and >= 0)")

    def _euclidean_step(self, group: dict, params: list[Tensor], whole_group: bool = False) -> None:
        self._accelerator_graph_capture_health_check()
        sub = group if whole_group else {**group, "params": params}
        ps: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        steps: list[Tensor] = []
        has_complex = self._init_group(sub, ps, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        beta1, beta2 = group["betas"]
        _torch_adam(
            ps, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
            fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None), decoupled_weight_decay=group["decoupled_weight_decay"],
        )
