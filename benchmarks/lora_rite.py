"""LoRA-RITE vs torch Adam: step time on the same LoRA factors, and iterations to a target error on
the canonical low-rank problem when the two factors start at unbalanced scales.

1. Step time: k pairs (A: r×n, B: n×r) with fixed random gradients; ``LoRARITE`` (escaped mass on
   and off) and ``torch.optim.Adam(foreach=True)`` on the same tensors, median over repeats, in one
   run; the ratio is RITE / Adam.
2. Low-rank regression: ½‖B A − T‖²_F with T = U diag(σ) Vᵀ (64×64, rank 4, σ geometric from 1 to
   1/κ; the target of the factorization benchmark), fit at rank r. The initial factors are
   (s·A₀, B₀/s): the same ΔW for every s, so a transformation-invariant method takes the same
   path for every s. Each method's lr is tuned on one grid per (κ, r, s): the fewest iterations to
   relative error ‖BA − T‖_F/‖T‖_F ≤ target, else the lowest final error.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stiefel_opt.optim.lora_rite import LoRARITE

from ._report import markdown_table, plot_lines, progress, write_json, write_markdown
from .factorization import make_target


@dataclass
class Grid:
    step_shapes: tuple = ((64, 1024, 16), (32, 768, 8), (16, 4096, 32))  # (pairs, n, r)
    step_repeats: int = 30
    size: int = 64
    rank_a: int = 4
    kappas: tuple = (10.0, 100.0)
    ranks: tuple = (4, 8)
    scales: tuple = (1.0, 10.0, 100.0)
    lrs: tuple = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    cap: int = 5000
    target: float = 1e-3
    init_std: float = 0.1


QUICK = Grid(step_shapes=((64, 1024, 16), (32, 768, 8)), step_repeats=10, kappas=(10.0,), ranks=(4,),
             lrs=(3e-3, 1e-2, 3e-2), cap=2000)


def _median_step_ms(opt: torch.optim.Optimizer, repeats: int) -> float:
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def step_times(grid: Grid) -> list[dict]:
    rows = []
    for k, n, r in progress(grid.step_shapes, desc="step time", leave=True):
        gen = torch.Generator().manual_seed(k * n + r)
        a_list = [(torch.randn(r, n, generator=gen) / n**0.5).requires_grad_() for _ in range(k)]
        b_list = [(torch.randn(n, r, generator=gen) * 0.01).requires_grad_() for _ in range(k)]
        for p in a_list + b_list:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        pairs = list(zip(a_list, b_list))
        row = {"pairs": k, "shape": f"A {r}×{n}, B {n}×{r}"}
        row["adam_ms"] = _median_step_ms(torch.optim.Adam(a_list + b_list, lr=1e-6, foreach=True), grid.step_repeats)
        row["rite_ms"] = _median_step_ms(LoRARITE(pairs, lr=1e-6), grid.step_repeats)
        row["rite_no_escape_ms"] = _median_step_ms(LoRARITE(pairs, lr=1e-6, escaped_mass=False), grid.step_repeats)
        row["rite/adam"] = row["rite_ms"] / row["adam_ms"]
        row["rite_no_escape/adam"] = row["rite_no_escape_ms"] / row["adam_ms"]
        rows.append(row)
    return rows


def fit(method: str, target: torch.Tensor, r: int, scale: float, lr: float, cap: int, goal: float,
        init_std: float) -> tuple[int | None, list[float]]:
    """Run one method from (s·A₀, B₀/s); return (first iteration at relative error ≤ goal, curve)."""
    gen = torch.Generator().manual_seed(17 + r)
    m, n = target.shape
    a = (torch.randn(r, n, generator=gen) * init_std * scale).requires_grad_()
    b = (torch.randn(m, r, generator=gen) * init_std / scale).requires_grad_()
    opt = LoRARITE([(a, b)], lr=lr) if method == "rite" else torch.optim.Adam([a, b], lr=lr)
    t_norm = float(target.norm())
    curve = []
    for it in range(cap):
        opt.zero_grad()
        resid = b @ a - target
        rel = float(resid.detach().norm()) / t_norm
        curve.append(rel)
        if rel <= goal:
            return it, curve
        if not rel < 1e3:  # diverged
            return None, curve
        (0.5 * resid.square().sum()).backward()
        opt.step()
    return None, curve


def regression(grid: Grid) -> tuple[list[dict], dict]:
    gen = torch.Generator().manual_seed(1000 * grid.size + 7)
    targets = make_target(grid.size, grid.size, grid.rank_a, grid.kappas, False, gen).to(torch.float32)
    rows, curves = [], {}
    configs = [(ki, r, s) for ki in range(len(grid.kappas)) for r in grid.ranks for s in grid.scales]
    for ki, r, s in progress(configs, desc="low-rank regression", leave=True):
        kappa = grid.kappas[ki]
        row = {"kappa": kappa, "r": r, "scale s": s}
        for method in ("rite", "adam"):
            best = None
            for lr in grid.lrs:
                hit, curve = fit(method, targets[ki], r, s, lr, grid.cap, grid.target, grid.init_std)
                key = (hit if hit is not None else grid.cap + 1, curve[-1])
                if best is None or key < best[0]:
                    best = (key, lr, hit, curve)
            _, lr, hit, curve = best
            row[f"{method}_iters"] = hit
            row[f"{method}_lr"] = lr
            row[f"{method}_final_err"] = curve[-1]
            curves[(kappa, r, s, method)] = curve
        rows.append(row)
    return rows, curves


def run(quick: bool = False, out: Path = Path("results/lora_rite"), grid: Grid | None = None) -> dict:
    """Write lora_rite.json/.md and the error-vs-iteration plots to ``out``."""
    grid = grid or (QUICK if quick else Grid())
    out = Path(out)
    t0 = time.perf_counter()
    timing = step_times(grid)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64×64 problems: a second thread only adds synchronisation
    try:
        reg_rows, curves = regression(grid)
    finally:
        torch.set_num_threads(threads)
    plots = []
    for kappa in grid.kappas:
        for r in grid.ranks:
            series = {}
            for s in (grid.scales[0], grid.scales[-1]):
                for method, label in (("rite", "LoRA-RITE"), ("adam", "Adam")):
                    c = curves[(kappa, r, s, method)]
                    series[f"{label}, s={s:g}"] = (range(len(c)), c)
            path = out / f"lora_rite_k{kappa:g}_r{r}.png"
            plot_lines(path, series, f"½‖BA − T‖², 64×64, rank 4, κ={kappa:g}, r={r}; init (s·A₀, B₀/s)",
                       "iteration", "relative error", logy=True, hline=grid.target)
            plots.append(path.name)
    result = {
        "grid": {k: v for k, v in vars(grid).items()},
        "step_time": timing,
        "regression": reg_rows,
        "plots": plots,
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / "lora_rite.json", result)
    write_markdown(
        out / "lora_rite.md",
        "LoRA-RITE vs Adam",
        [
            f"## Step time (median of {grid.step_repeats}, fixed gradients; threads = {threads})",
            markdown_table(timing),
            f"## Iterations to relative error {grid.target:g} (cap {grid.cap}; – = not reached), "
            f"lr tuned per cell on {list(grid.lrs)}",
            "Initial factors (s·A₀, B₀/s) give the same ΔW for every s.",
            markdown_table(reg_rows),
            "\n".join(f"![{p}]({p})" for p in plots),
        ],
    )
    return result
