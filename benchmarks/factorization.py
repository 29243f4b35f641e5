"""PoLAR's canonical low-rank problem (its Fig. 3), at CPU scale.

Asymmetric: A = U diag(σ) Vᵀ ∈ R^{m×n} of rank r_A, σ geometric from 1 to 1/κ; fit ½‖M − A‖²_F with
- ``bm``            Burer–Monteiro + GD: M = BCᵀ, ∇_B = RC, ∇_C = RᵀB  (R = M − A)
- ``bm_prec``       BM + preconditioned GD (ScaledGD/PrecGD): ∇_B (CᵀC + δI)⁻¹, ∇_C (BᵀB + δI)⁻¹,
                    δ = ‖R‖_F/‖A‖_F
- ``polar_rgd``     PoLAR + Riemannian GD: M = XΘYᵀ, X ∈ St(m,r), Y ∈ St(n,r), Θ ∈ R^{r×r} free;
                    ∇_X = RYΘᵀ, ∇_Θ = XᵀRY, ∇_Y = RᵀXΘ; X ← R_X(−η P_X ∇_X) (polar), Θ ← Θ − η∇_Θ
- ``polar_landing`` the same gradients; X ← X − η'Λ(X, ∇_X), η' = min(η, safe step), λ = ``Grid.lam``
- ``polar_vp``      Θ set to its exact least-squares value XᵀAY each step (a Θ step of size 1),
                    then plain RGD on X, Y: tests whether per-factor step sizes are the problem
- ``polar_prgd``    exact Θ, then preconditioned RGD (the fix): X ← R_X(−η P_X(∇_X (ΘΘᵀ + δI)⁻¹)),
                    Y ← R_Y(−η P_Y(∇_Y (ΘᵀΘ + δI)⁻¹)), δ = max((‖R‖_F/‖A‖_F)², 1e-10)
Symmetric (A = U diag(σ) Uᵀ, PSD): BM fits ¼‖XXᵀ − A‖² (∇ = RX); the PoLAR forms fit
½‖QΘQᵀ − A‖² with Q ∈ St(n,r), Θ symmetric (∇_Q = 2RQΘ, ∇_Θ = QᵀRQ), same variants.

Why plain RGD stalls at κ = 100: with X, Y on the manifold the Θ-problem has identity Hessian
(a Θ step of 1 solves it), but turning column i of X toward its singular vector has curvature
σ_i², because the gradient RYΘᵀ carries Θ ≈ diag(σ). A fixed step η ≲ 1/σ_1² = 1 contracts that
error by (1 − ησ_i²) per iteration: about κ² ln(1/ε) iterations (κ = 10: ~1,400, the ~1,700
measured; κ = 100: ~140,000). BM+GD contracts by (1 − ησ_i) since each factor carries √σ, so its
exact-rank cost grows like κ, not κ². Solving Θ exactly (``polar_vp``) does not help (same κ²
rate, measured); scaling the Stiefel gradient by (ΘΘᵀ + δI)⁻¹ gives every column the rate
≈ 1 − η, independent of κ. Updating Θ first matters: with the exact Θ, XᵀRY = 0, so ∇_X is
tangent and the preconditioned direction is a descent direction; preconditioning the
simultaneous update instead drifted along the (X, Θ, Y) gauge orbit without decreasing the error.

Every method runs its whole step-size grid (and all κ and seeds) as one float64 batch; the step
size is tuned per method and (problem, size, κ, r): the one reaching relative error
‖M − A‖_F/‖A‖_F ≤ target in the fewest iterations (worst seed), else the lowest final error.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from stiefel_opt import functional as F

from ._report import device_header, markdown_table, plot_lines, progress, write_json, write_markdown

METHODS = ("bm", "bm_prec", "polar_rgd", "polar_landing", "polar_vp", "polar_prgd")
LABELS = {
    "bm": "BM+GD",
    "bm_prec": "BM+precond. GD",
    "polar_rgd": "PoLAR+RGD",
    "polar_landing": "PoLAR+landing",
    "polar_vp": "PoLAR+exact Θ+RGD",
    "polar_prgd": "PoLAR+exact Θ+precond. RGD",
}


@dataclass
class Grid:
    sizes: tuple = (64, 128)
    rank_a: int = 4
    kappas: tuple = (10.0, 100.0, 1000.0)
    ranks: tuple = (4, 8, 16)
    lrs: tuple = (2.0, 1.0, 0.5, 0.25, 0.125)
    seeds: int = 2
    cap: int = 20_000
    target: float = 1e-6
    init_scale: float = 1e-2
    lam: float = 0.25
    problems: tuple = ("asymmetric", "symmetric")
    methods: tuple = METHODS


QUICK = Grid(sizes=(48,), rank_a=3, kappas=(10.0, 100.0), ranks=(3, 8), lrs=(1.0, 0.5, 0.25, 0.125), seeds=1, cap=3_000)


# ---------------------------------------------------------------- problems

def make_target(n_rows: int, n_cols: int, rank_a: int, kappas, symmetric: bool, generator=None) -> Tensor:
    """A stack (one per κ) of A = U diag(σ) Vᵀ (or U diag(σ) Uᵀ), σ_i = κ^(−i/(r_A−1)), in float64."""
    u = F.random_point(n_rows, rank_a, dtype=torch.float64, generator=generator)
    v = u if symmetric else F.random_point(n_cols, rank_a, dtype=torch.float64, generator=generator)
    out = []
    for kappa in kappas:
        sigma = torch.logspace(0, -math.log10(kappa), rank_a, dtype=torch.float64) if rank_a > 1 else torch.ones(1, dtype=torch.float64)
        out.append((u * sigma) @ v.T)
    return torch.stack(out)


def init_state(method: str, symmetric: bool, batch: int, n_rows: int, n_cols: int, r: int, scale: float, generator=None):
    """Initial factors: BM entries N(0, scale²); PoLAR X, Y Haar on the Stiefel manifold, Θ entries N(0, scale²)."""
    dt = torch.float64

    def gauss(*shape):
        return scale * torch.randn(*shape, dtype=dt, generator=generator)

    if method in ("bm", "bm_prec"):
        return [gauss(batch, n_rows, r)] if symmetric else [gauss(batch, n_rows, r), gauss(batch, n_cols, r)]
    x = F.random_point(batch, n_rows, r, dtype=dt, generator=generator)
    theta = gauss(batch, r, r)
    if symmetric:
        return [x, F.sym(theta)]
    return [x, theta, F.random_point(batch, n_cols, r, dtype=dt, generator=generator)]


def product(method: str, symmetric: bool, state) -> Tensor:
    """The fitted matrix M of a state."""
    if method in ("bm", "bm_prec"):
        b = state[0]
        c = b if symmetric else state[1]
        return b @ c.transpose(-1, -2)
    x, theta = state[0], state[1]
    y = x if symmetric else state[2]
    return x @ theta @ y.transpose(-1, -2)


def loss(method: str, symmetric: bool, state, a: Tensor) -> Tensor:
    """The objective each method minimizes (summed over the batch): ¼‖XXᵀ − A‖² for symmetric BM, else ½‖M − A‖²."""
    r = product(method, symmetric, state) - a
    c = 0.25 if (symmetric and method in ("bm", "bm_prec")) else 0.5
    return c * (r * r).sum()


def gradients(method: str, symmetric: bool, state, resid: Tensor) -> list[Tensor]:
    """Euclidean gradients in closed form, given the residual R = M − A (see the module docstring)."""
    t = lambda z: z.transpose(-1, -2)  # noqa: E731
    if method in ("bm", "bm_prec"):
        if symmetric:
            return [resid @ state[0]]
        b, c = state
        return [resid @ c, t(resid) @ b]
    if symmetric:
        q, theta = state
        rq = resid @ q
        return [2.0 * rq @ theta, t(q) @ rq]
    x, theta, y = state
    ry = resid @ y
    rtx = t(resid) @ x
    return [ry @ t(theta), t(x) @ ry, rtx @ theta]


def _precondition(g: Tensor, theta: Tensor, delta: Tensor, right: bool) -> Tensor:
    """G (ΘΘᵀ + δI)⁻¹ (right=False) or G (ΘᵀΘ + δI)⁻¹ (right=True), by a Cholesky solve."""
    gram = theta.transpose(-1, -2) @ theta if right else theta @ theta.transpose(-1, -2)
    gram = gram + delta[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram)
    return torch.cholesky_solve(g.transpose(-1, -2), chol).transpose(-1, -2)


def _delta(rel_err: Tensor) -> Tensor:
    """Damping δ = max((‖R‖_F/‖A‖_F)², 1e-10) of the preconditioner (σ_1 = 1 here).

    Θ's Gram scales like σ², the residual like σ; the floor keeps the Gram of an over-parameterized
    (rank-deficient) Θ positive definite once the residual is at round-off.
    """
    return (rel_err.clamp_max(1.0) ** 2).clamp_min(1e-10)


def step(method: str, symmetric: bool, state, a: Tensor, lr: Tensor, lam: float):
    """One iteration on the batch; ``lr`` has shape (batch,). Returns (new state, residual of ``state``).

    ``polar_vp`` and ``polar_prgd`` first set Θ to its exact least-squares value (a Θ-gradient step of
    size 1, = XᵀAY since X, Y are orthonormal), recompute R, then move X and Y: their gradients are
    then tangent (XᵀRY = 0), so the preconditioned direction of ``polar_prgd`` is a descent direction.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    resid = product(method, symmetric, state) - a
    grads = gradients(method, symmetric, state, resid)
    eta = lr[:, None, None]
    if method == "bm":
        return [p - eta * g for p, g in zip(state, grads)], resid
    if method == "bm_prec":
        rel = torch.linalg.matrix_norm(resid) / torch.linalg.matrix_norm(a)
        delta = rel.clamp(1e-10, 1.0)
        if symmetric:
            return [state[0] - eta * _precondition(grads[0], state[0], delta, right=True)], resid
        b, c = state
        return [b - eta * _precondition(grads[0], c, delta, right=True),
                c - eta * _precondition(grads[1], b, delta, right=True)], resid
    # Stiefel factors are state[0] (and state[2] when asymmetric); Θ is state[1].
    out = list(state)
    exact_theta = method in ("polar_vp", "polar_prgd")
    new_theta = state[1] - (grads[1] if exact_theta else eta * grads[1])
    out[1] = F.sym(new_theta) if symmetric else new_theta
    if exact_theta:
        grads = gradients(method, symmetric, out, product(method, symmetric, out) - a)
    theta = out[1] if exact_theta else state[1]
    delta = _delta(torch.linalg.matrix_norm(resid) / torch.linalg.matrix_norm(a))
    for i, right in [(0, False)] if symmetric else [(0, False), (2, True)]:
        x, g = state[i], grads[i]
        if method == "polar_landing":
            field_ = F.landing_field(x, g, lam)
            eta_safe = F.safe_step(F.infeasibility(x), torch.linalg.matrix_norm(field_), lam)
            out[i] = x - torch.minimum(lr, eta_safe)[:, None, None] * field_
            continue
        if method == "polar_prgd":
            g = _precondition(g, theta, delta, right)
        out[i] = F.retract(x, -eta * F.proj_tangent(x, g), "polar")
    return out, resid


@dataclass
class RunResult:
    history: Tensor  # (iterations+1, batch) relative errors (NaN after divergence)
    hit: Tensor  # (batch,) first iteration with error ≤ target, or −1
    seconds: float
    feasibility: Tensor | None = field(default=None)  # (batch,) max ‖XᵀX − I‖_F over the run (PoLAR forms)


def run_batch(method, symmetric, a, lrs, cap, target, init_scale, lam, seeds, generator, r, desc=""):
    """Run one method on the batch (κ × lr × seed); stop when every κ has one lr with all seeds at target.

    ``a`` is (K, m, n); the batch is ordered κ-major, then lr, then seed.
    """
    n_k, n_lr = a.shape[0], len(lrs)
    batch = n_k * n_lr * seeds
    a_b = a.repeat_interleave(n_lr * seeds, dim=0)
    lr = torch.tensor(lrs, dtype=torch.float64).repeat_interleave(seeds).repeat(n_k)
    a_norm = torch.linalg.matrix_norm(a_b)
    state = init_state(method, symmetric, batch, a.shape[1], a.shape[2], r, init_scale, generator)
    init = [s.clone() for s in state]
    history = torch.full((cap + 1, batch), float("nan"), dtype=torch.float64)
    hit = torch.full((batch,), -1, dtype=torch.long)
    alive = torch.ones(batch, dtype=torch.bool)
    feas = torch.zeros(batch, dtype=torch.float64)
    t0 = time.perf_counter()
    last = 0
    bar = progress(range(cap + 1), desc=desc)
    for it in bar:
        new_state, resid = step(method, symmetric, state, a_b, torch.where(alive, lr, 0.0), lam)
        rel = torch.linalg.matrix_norm(resid) / a_norm
        finite = torch.stack([torch.isfinite(t).all(dim=(-1, -2)) for t in new_state]).all(dim=0)
        bad = alive & ~(finite & torch.isfinite(rel) & (rel < 1e3))
        if bool(bad.any()):  # diverged: freeze at the initial point so nothing non-finite is factorized
            alive &= ~bad
            new_state = [torch.where(bad[:, None, None], s0, s) for s, s0 in zip(new_state, init)]
        history[it] = torch.where(alive, rel, float("nan"))
        hit[alive & (hit < 0) & (rel <= target)] = it
        last = it
        if method.startswith("polar"):
            for s in [state[0]] if symmetric else [state[0], state[2]]:
                feas = torch.maximum(feas, torch.where(alive, F.infeasibility(s), 0.0))
        if it == cap or (it % 50 == 0 and _all_groups_done(hit, alive, n_k, n_lr, seeds)):
            break
        state = new_state
    bar.close()
    seconds = time.perf_counter() - t0
    return RunResult(history[: last + 1], hit, seconds, feas if method.startswith("polar") else None)


def _all_groups_done(hit, alive, n_k, n_lr, seeds) -> bool:
    ok = ((hit >= 0) & alive).view(n_k, n_lr, seeds).all(dim=2)
    return bool(ok.any(dim=1).all())


def summarize(res: RunResult, lrs, n_k, seeds, cap):
    """Per κ: the tuned lr (fewest worst-seed iterations to target, else lowest worst-seed final error)."""
    n_lr = len(lrs)
    hist = res.history.view(-1, n_k, n_lr, seeds)
    hit = res.hit.view(n_k, n_lr, seeds)
    out = []
    for k in range(n_k):
        reached = (hit[k] >= 0).all(dim=1)
        final = hist[-1, k].nan_to_num(float("inf")).max(dim=1).values
        if bool(reached.any()):
            iters = torch.where(reached, hit[k].max(dim=1).values, torch.iinfo(torch.long).max)
            j = int(iters.argmin())
        else:
            j = int(final.argmin())
        worst = hist[:, k, j].nan_to_num(float("inf")).max(dim=1).values
        out.append(
            {
                "lr": lrs[j],
                "iters": int(hit[k, j].max()) if bool(reached[j]) else None,
                "final_rel_err": float(worst[-1]),
                "curve": worst,
                "diverged_lrs": [lrs[i] for i in range(n_lr) if bool(torch.isnan(hist[-1, k, i]).any())],
            }
        )
    return out


def local_rate(curve: Tensor, target: float) -> float | None:
    """Geometric-mean contraction per iteration over the last decade above the target (None if too short)."""
    c = curve[torch.isfinite(curve)]
    c = c[c > target]
    if c.numel() < 20:
        return None
    end = float(c[-1])
    start_idx = int((c > 10 * end).nonzero().max()) if bool((c > 10 * end).any()) else 0
    span = c.numel() - 1 - start_idx
    if span < 10:
        return None
    return (end / float(c[start_idx])) ** (1.0 / span)


def run(quick: bool = False, out: Path = Path("results/factorization"), grid: Grid | None = None) -> dict:
    """Run the grid (``QUICK`` when quick), write factorization.json/.md and the error-vs-iteration plots."""
    grid = grid or (QUICK if quick else Grid())
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are tiny: a second thread only adds synchronization
    try:
        return _run(grid, out)
    finally:
        torch.set_num_threads(threads)


def _run(grid: Grid, out: Path) -> dict:
    torch.manual_seed(0)
    rows, record = [], []
    t_start = time.perf_counter()
    configs = [(p, s, r) for p in grid.problems for s in grid.sizes for r in grid.ranks]
    outer = progress(configs, desc="factorization", leave=True)
    for problem, size, r in outer:
        symmetric = problem == "symmetric"
        gen = torch.Generator().manual_seed(1000 * size + 7)
        a = make_target(size, size, grid.rank_a, grid.kappas, symmetric, gen)
        curves = {k: {} for k in grid.kappas}
        for method in grid.methods:
            gen_m = torch.Generator().manual_seed(size * 31 + r)  # same initial draw for every method
            res = run_batch(
                method, symmetric, a, grid.lrs, grid.cap, grid.target, grid.init_scale, grid.lam,
                grid.seeds, gen_m, r, desc=f"{problem[:4]} n={size} r={r} {method}",
            )
            for k, summ in zip(grid.kappas, summarize(res, grid.lrs, len(grid.kappas), grid.seeds, grid.cap)):
                curves[k][method] = summ["curve"]
                rate = local_rate(summ["curve"], grid.target)
                row = {
                    "problem": problem,
                    "n": size,
                    "r": r,
                    "kappa": int(k),
                    "method": LABELS[method],
                    "lr": summ["lr"],
                    "iters_to_target": summ["iters"] if summ["iters"] is not None else f">{len(summ['curve']) - 1}",
                    "final_rel_err": summ["final_rel_err"],
                    "rate_last_decade": rate,
                }
                rows.append(row)
                record.append(
                    {**row, "diverged_lrs": summ["diverged_lrs"], "seconds_batch": res.seconds,
                     "max_feasibility": None if res.feasibility is None else float(res.feasibility.max())}
                )
        for k in grid.kappas:
            series = {}
            for method, curve in curves[k].items():
                c = curve[torch.isfinite(curve)]
                xs = sorted(set(torch.logspace(0, math.log10(c.numel()), 400).long().clamp_max(c.numel()).tolist()))
                series[LABELS[method]] = (xs, c[[x - 1 for x in xs]].tolist())
            plot_lines(
                out / f"{problem}_n{size}_r{r}_kappa{int(k)}.png", series,
                f"{problem}, n={size}, r_A={grid.rank_a}, r={r}, κ={int(k)} (tuned step)",
                "iteration + 1", "relative error ‖M−A‖/‖A‖", logy=True, logx=True, hline=grid.target,
            )
        _write_reports(out, grid, rows, record, time.perf_counter() - t_start, complete=False)
    result = _write_reports(out, grid, rows, record, time.perf_counter() - t_start, complete=True)
    print(pivot_table(rows, grid))
    print(result["verdicts"])
    return result


def _write_reports(out: Path, grid: Grid, rows, record, seconds: float, complete: bool) -> dict:
    """factorization.md and .json from the rows so far (rewritten after every configuration)."""
    verdicts = claim_verdicts(rows, grid)
    setup = (
        f"Grid: sizes {list(grid.sizes)}, r_A = {grid.rank_a}, κ ∈ {[int(k) for k in grid.kappas]}, "
        f"r ∈ {list(grid.ranks)}, step grid {list(grid.lrs)} (same for every method), {grid.seeds} seed(s) "
        f"(worst seed reported), cap {grid.cap} iterations, target relative error {grid.target:g}, "
        f"initial scale {grid.init_scale:g} (BM entries, Θ entries; X, Y Haar), landing λ = {grid.lam:g}, "
        f"float64. {'Total' if complete else 'PARTIAL (run in progress), so far'} {seconds:.0f} s."
    )
    table = markdown_table(rows, ["problem", "n", "r", "kappa", "method", "lr", "iters_to_target", "final_rel_err", "rate_last_decade"])
    write_markdown(out / "factorization.md", "Low-rank factorization: BM+GD vs PoLAR",
                   [setup, "## Iterations to the target (tuned step; >cap: not reached)", pivot_table(rows, grid),
                    "## The paper's claim, cell by cell", verdicts, "## All runs", table])
    result = {"header": device_header(), "grid": grid.__dict__, "rows": record, "verdicts": verdicts,
              "seconds": seconds, "complete": complete}
    write_json(out / "factorization.json", result)
    return result


def pivot_table(rows, grid) -> str:
    """One row per (problem, n, r, κ), one column per method: iterations to target (or >cap)."""
    cells: dict[tuple, dict] = {}
    for row in rows:
        key = (row["problem"], row["n"], row["r"], row["kappa"])
        cells.setdefault(key, {"problem": key[0], "n": key[1], "r": key[2], "κ": key[3]})[row["method"]] = row["iters_to_target"]
    return markdown_table(list(cells.values()), ["problem", "n", "r", "κ"] + [LABELS[m] for m in grid.methods])


def claim_verdicts(rows, grid) -> str:
    """The paper's claim cell by cell: over-parameterized (r > r_A) BM+GD sublinear, PoLAR+RGD linear."""
    lines = []
    by = {}
    for row in rows:
        by[(row["problem"], row["n"], row["r"], row["kappa"], row["method"])] = row
    for (problem, n, r, k, method), row in by.items():
        if method != LABELS["bm"] or r <= grid.rank_a:
            continue
        polar = by.get((problem, n, r, k, LABELS["polar_rgd"]))
        if polar is None:
            continue
        bm_it, po_it = row["iters_to_target"], polar["iters_to_target"]
        bm_ok, po_ok = isinstance(bm_it, int), isinstance(po_it, int)
        if po_ok and (not bm_ok or po_it < bm_it):
            verdict = "holds (PoLAR+RGD faster)"
        elif bm_ok and not po_ok:
            verdict = "fails (BM+GD reaches the target, PoLAR+RGD does not)"
        elif bm_ok and po_ok:
            verdict = "fails (BM+GD faster)"
        else:
            bm_err, po_err = row["final_rel_err"], polar["final_rel_err"]
            lower = "PoLAR+RGD" if po_err < bm_err else "BM+GD"
            verdict = (f"neither reaches the target; final errors BM+GD {bm_err:.1e}, PoLAR+RGD {po_err:.1e} "
                       f"({lower} closer{'' if lower == 'PoLAR+RGD' else ': the claim fails here'})")
        lines.append(f"- {problem}, n={n}, r={r}, κ={k}: BM+GD {bm_it}, PoLAR+RGD {po_it} iterations → {verdict}")
    return "\n".join(lines) + "\n"
