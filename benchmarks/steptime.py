"""Optimizer step time on Stiefel parameter mixes, as ratios measured side by side in one process.

For each mix (count × (n × p)) the step of every optimizer of the package is timed on Stiefel
parameters, next to ``torch.optim.Adam(foreach=True)`` on unconstrained parameters of the same
shapes and geoopt's ``RiemannianAdam`` on the same Stiefel matrices (EuclideanStiefel, QR).
Gradients are fixed; ``step()`` alone is timed (median over repeats). Reported: ms per step,
ratio to torch Adam, speed-up over geoopt, optimizer-state bytes, and the peak memory of a step
(CUDA only: on CPU torch has no allocator statistics, so the column reads "n/a (CPU)").

``python -m benchmarks steptime [--quick] [--out results]``
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks._report import device_header, markdown_table, progress, write_json, write_markdown
from stiefel_opt import (LandingAdam, LandingSGD, RiemannianAdam, RiemannianSGD, StiefelParameter, landing,
                         riemannian)
from stiefel_opt import functional as F
from stiefel_opt._geoopt import geoopt

MIXES = [(16, 4096, 32), (64, 1024, 16), (32, 768, 8)]


def _optimizers():
    return {
        "torch Adam (foreach, unconstrained)": None,
        "geoopt RiemannianAdam": None,
        "RiemannianSGD (momentum 0.9)": lambda ps: RiemannianSGD(ps, lr=1e-3, momentum=0.9),
        "RiemannianAdam": lambda ps: RiemannianAdam(ps, lr=1e-3),
        "LandingSGD (momentum 0.9)": lambda ps: LandingSGD(ps, lr=1e-3, momentum=0.9),
        "LandingAdam": lambda ps: LandingAdam(ps, lr=1e-3),
        "riemannian(AdamW)": lambda ps: riemannian(torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        "landing(Adam)": lambda ps: landing(torch.optim.Adam(ps, lr=1e-3, foreach=True)),
    }


def _params(count, n, p, kind, device):
    gen = torch.Generator().manual_seed(0)
    xs = F.random_point(count, n, p, generator=gen)
    grads = torch.randn(count, n, p, generator=gen) * 1e-2
    if kind == "plain":
        ps = [torch.nn.Parameter(x.clone().to(device)) for x in xs]
    elif kind == "geoopt":
        m = geoopt.EuclideanStiefel()
        ps = [geoopt.ManifoldParameter(x.clone().to(device), manifold=m) for x in xs]
    else:
        ps = [StiefelParameter(x.clone().to(device), check=False) for x in xs]
    for prm, g in zip(ps, grads):
        prm.grad = g.clone().to(device)
    return ps


def _state_bytes(opt) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel())
                if key not in seen:
                    seen.add(key)
                    total += v.numel() * v.element_size()
    return total


def _time(opt, device, warmup, repeats) -> tuple[float, float | None]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        opt.step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    times.sort()
    return 1e3 * times[len(times) // 2], peak


def run(quick: bool = False, out: Path = Path("results/steptime")) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warmup, repeats = (1, 5) if quick else (5, 30)
    makers = _optimizers()
    rows, results = [], {}
    jobs = [(mix, name) for mix in MIXES for name in makers]
    for (count, n, p), name in progress(jobs, desc="steptime"):
        mix = f"{count}×({n}×{p})"
        if name.startswith("torch Adam"):
            opt = torch.optim.Adam(_params(count, n, p, "plain", device), lr=1e-3, foreach=True)
        elif name.startswith("geoopt"):
            opt = geoopt.optim.RiemannianAdam(_params(count, n, p, "geoopt", device), lr=1e-3)
        else:
            opt = makers[name](_params(count, n, p, "stiefel", device))
        ms, peak = _time(opt, device, warmup, repeats)
        results.setdefault(mix, {})[name] = {"ms": ms, "state_MiB": _state_bytes(opt) / 2**20, "peak_MiB": peak}
    for mix, res in results.items():
        base = res["torch Adam (foreach, unconstrained)"]["ms"]
        geo = res["geoopt RiemannianAdam"]["ms"]
        for name, r in res.items():
            r["x_torch_adam"] = r["ms"] / base
            r["geoopt_speedup"] = geo / r["ms"]
            rows.append({
                "mix": mix, "optimizer": name, "ms/step": round(r["ms"], 3),
                "÷ torch Adam": round(r["x_torch_adam"], 2), "geoopt RAdam ÷ this": round(r["geoopt_speedup"], 2),
                "state MiB": round(r["state_MiB"], 1),
                "peak MiB": "n/a (CPU)" if r["peak_MiB"] is None else round(r["peak_MiB"], 1),
            })
    header = device_header(device)
    data = {"device": header, "quick": quick, "warmup": warmup, "repeats": repeats, "results": results}
    write_json(out / "steptime.json", data)
    table = markdown_table(rows)
    write_markdown(out / "steptime.md", "Optimizer step time", [
        "Median ms per `step()` with fixed gradients; ratios measured side by side in one process. "
        "`÷ torch Adam`: this step / torch Adam(foreach) on unconstrained parameters of the same shapes. "
        "`geoopt RAdam ÷ this`: speed-up over geoopt's RiemannianAdam on the same Stiefel matrices.",
        table,
    ], device=device.type)
    _plot(results, out / "steptime.png", header)
    print(header)
    print(table)
    return data


def _plot(results: dict, path: Path, header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(results)
    names = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(mixes))], [results[m][name]["ms"] for m in mixes], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mixes))], mixes)
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (log)")
    ax.set_title(header, fontsize=7)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
