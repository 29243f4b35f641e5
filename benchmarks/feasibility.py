"""Distance to the manifold ‖XᵀX − I‖_F over many steps, per optimizer, in fp32 and bf16.

Problem: noisy PCA on St(n, p): at each step G = −C X + Ξ_t with C = U diag(σ) Uᵀ (σ from 1 down
to 0.01 over the first 2p directions, ‖C‖ = 1) and Ξ_t Gaussian with entries N(0, 0.01/n)
(‖Ξ_t‖_F ≈ 0.1√p, fresh each step and per matrix), so the gradient never vanishes (the regime of
a training run). The noise is drawn in the shape of X (n·p numbers, not an n×n matrix) so that the
harness costs less than the step it measures. ``k`` matrices of the same shape, each its own
parameter (the optimizers batch them). bf16: the parameters are stored
in bf16 (the optimizers keep fp32 master copies where they offer one); the distance is measured on
the stored parameter, which is what a model uses. geoopt's RiemannianAdam on its EuclideanStiefel
manifold (QR retraction, as in ``steptime``) is the peer; a crash is reported as such.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ._report import device_header, markdown_table, plot_lines, progress, write_json, write_markdown

N, P, K = 256, 16, 4


def _optimizers():
    import stiefel_opt as so
    from stiefel_opt._geoopt import geoopt

    return {
        "RiemannianSGD(lr=0.1, momentum=0.9)": lambda ps: so.RiemannianSGD(ps, lr=0.1, momentum=0.9),
        "RiemannianAdam(lr=1e-3)": lambda ps: so.RiemannianAdam(ps, lr=1e-3),
        "LandingSGD(lr=0.1, momentum=0.9)": lambda ps: so.LandingSGD(ps, lr=0.1, momentum=0.9),
        "LandingAdam(lr=1e-3)": lambda ps: so.LandingAdam(ps, lr=1e-3),
        "landing(torch Adam(lr=1e-3))": lambda ps: so.landing(torch.optim.Adam(ps, lr=1e-3)),
        "riemannian(torch AdamW(lr=1e-3))": lambda ps: so.riemannian(torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0)),
        "geoopt RiemannianAdam(lr=1e-3)": lambda ps: geoopt.optim.RiemannianAdam(ps, lr=1e-3),
    }


def _params(name: str, dtype: torch.dtype, gen: torch.Generator):
    from stiefel_opt import StiefelParameter, functional as F
    from stiefel_opt._geoopt import geoopt

    xs = [F.random_point(N, P, generator=gen) for _ in range(K)]
    if name.startswith("geoopt"):
        return [geoopt.ManifoldParameter(x.to(dtype), manifold=geoopt.EuclideanStiefel()) for x in xs]
    return [StiefelParameter(x.to(dtype)) for x in xs]


def run_one(name: str, make, dtype: torch.dtype, steps: int, every: int, seed: int = 0) -> dict:
    """Run ``steps`` steps; return the distance curve (max over the k matrices) or the error."""
    from stiefel_opt import functional as F

    gen = torch.Generator().manual_seed(seed)
    u = F.random_point(N, 2 * P, generator=gen)
    c = (u * torch.logspace(0, -2, 2 * P)) @ u.T
    params = _params(name, dtype, gen)
    opt = make(params)
    curve, t0 = [], time.perf_counter()
    try:
        for t in progress(range(steps + 1), desc=f"{name} {str(dtype)[6:]}"):
            if t % every == 0 or t == steps:
                d = max(float(F.infeasibility(p.detach().float())) for p in params)
                curve.append((t, d))
                if not torch.isfinite(torch.tensor(d)):
                    raise FloatingPointError(f"non-finite distance at step {t}")
            if t == steps:
                break
            x = torch.stack([p.detach() for p in params]).float()
            g = torch.randn(K, N, P, generator=gen).mul_(0.1 / N ** 0.5).sub_(c @ x).to(dtype)
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
    except Exception as exc:  # a peer that crashes is a result, reported as such
        return {"curve": curve, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                "seconds": time.perf_counter() - t0}
    return {"curve": curve, "error": None, "seconds": time.perf_counter() - t0}


def run(quick: bool = False, out: Path = Path("results/feasibility")) -> dict:
    """All optimizers × {fp32, bf16}; 100,000 steps (quick: 2,000). Writes JSON, Markdown, plots.

    The report is rewritten after every run, so an interrupted run leaves the runs done so far.
    """
    out = Path(out)
    steps = 2_000 if quick else 100_000
    every = max(1, steps // 200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster and leaves the other core free
    t_start = time.perf_counter()
    try:
        results, rows = {}, []
        for dtype in (torch.float32, torch.bfloat16):
            for name, make in _optimizers().items():
                res = run_one(name, make, dtype, steps, every)
                results[f"{name} {dtype}"] = {**res, "optimizer": name, "dtype": str(dtype)[6:]}
                ds = [d for _, d in res["curve"]]
                rows.append({
                    "optimizer": name, "dtype": str(dtype)[6:],
                    "steps done": res["curve"][-1][0] if res["curve"] else 0,
                    "final ‖XᵀX−I‖": ds[-1] if ds else None, "max ‖XᵀX−I‖": max(ds) if ds else None,
                    "ms/step (incl. gradient)": (1e3 * res["seconds"] / res["curve"][-1][0]
                                                 if res["curve"] and res["curve"][-1][0] else None),
                    "error": res["error"] or "",
                })
                _write_reports(out, steps, every, rows, results, time.perf_counter() - t_start, complete=False)
    finally:
        torch.set_num_threads(threads)
    _write_reports(out, steps, every, rows, results, time.perf_counter() - t_start, complete=True)
    print(markdown_table(rows))
    return {"rows": rows, "results": results}


def _write_reports(out: Path, steps: int, every: int, rows, results, seconds: float, complete: bool) -> None:
    """feasibility.md/.json and one plot per dtype from the runs done so far."""
    for dtype in sorted({r["dtype"] for r in results.values()}):
        series = {r["optimizer"]: ([t for t, _ in r["curve"]], [max(d, 1e-16) for _, d in r["curve"]])
                  for r in results.values() if r["dtype"] == dtype and r["curve"]}
        plot_lines(out / f"feasibility_{dtype}.png", series,
                   f"distance to St({N},{P}) (max over {K} matrices), {dtype} parameters",
                   "step", "‖XᵀX − I‖_F", logy=True)
    setup = (f"Noisy PCA on St({N}, {P}), {K} matrices, {steps} steps, gradient −CX + Ξ_t with fresh "
             "Gaussian noise Ξ_t (‖Ξ_t‖_F ≈ 0.1√p); distance ‖XᵀX − I‖_F measured on the stored parameter "
             f"every {every} steps (max over the matrices). geoopt: RiemannianAdam on EuclideanStiefel. "
             f"{'Total' if complete else 'PARTIAL (run in progress), so far'} {seconds:.0f} s.")
    write_markdown(out / "feasibility.md", "Feasibility over long runs", [setup, markdown_table(rows)])
    write_json(out / "feasibility.json", {"header": device_header(), "steps": steps, "rows": rows,
                                          "results": results, "seconds": seconds, "complete": complete})
