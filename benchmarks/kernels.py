"""Fused-kernel benchmark (issue 6): each hot Stiefel op on a (B, n, p) stack, timed side by side in
one process as ``backend="torch"`` (the functional reference, eager), ``compile=True`` (the same
torch function through ``torch.compile``) and — only where a CUDA device exists — ``backend="triton"``
(the fused kernels of ``stiefel_opt.kernels``). Every row says which device measured it; no GPU
figure is written unless it was measured on a GPU in this run.

``python -m benchmarks kernels [--quick] [--out results]`` writes ``kernels.json`` and ``kernels.md``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from stiefel_opt import functional as F
from stiefel_opt import kernels as K

OPS = ("landing_field", "retract_polar", "landing_adam_step", "landing_sgd_momentum_step",
       "riemannian_sgd_polar_step", "riemannian_adam_polar_step")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def _make_op(name: str, backend: str, shape: tuple, device: torch.device):
    """A zero-argument callable running ``name`` once for ``backend`` on fresh random inputs."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = F.random_point(*shape, generator=gen).to(device)
    g = torch.randn(shape, generator=gen).to(device)
    m, v = 0.1 * torch.randn(shape, generator=gen).to(device), torch.rand(shape, generator=gen).to(device)
    buf = torch.randn(shape, generator=gen).to(device)
    mod = K if backend == "triton" else F
    fns = {
        "landing_field": (mod.landing_field, lambda f: f(x, g, 1.0)),
        "retract_polar": (mod.retract_polar, lambda f: f(x, 0.01 * g)),
        # step fixed: a Python int that changed every call would make torch.compile recompile
        "landing_adam_step": (mod.landing_adam_update, lambda f: f(x, g, m, v, step=10, lr=1e-3)),
        "landing_sgd_momentum_step": (mod.landing_sgd_update, lambda f: f(x, g, buf, lr=1e-3, momentum=0.9)),
        # momentum 0.9 / Adam, polar retraction (the fused forms of RiemannianSGD/Adam)
        "riemannian_sgd_polar_step": (mod.riemannian_sgd_update,
                                      lambda f: f(x, g, buf, lr=1e-3, momentum=0.9, retraction="polar")),
        "riemannian_adam_polar_step": (mod.riemannian_adam_update,
                                       lambda f: f(x, g, m, v, step=10, lr=1e-3, retraction="polar")),
    }
    fn, call = fns[name]
    if backend == "compile":
        fn = torch.compile(fn, dynamic=False)
    return lambda: call(fn)


def _time(op, device: torch.device, repeats: int) -> float:
    """Median wall time of one call in ms (after 3 warm-up calls, which include compilation)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        op()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        op()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(quick: bool, out: Path, threads: int = 1) -> dict:
    """Time every op for each backend on each device; ``threads`` CPU threads (1 by default: on a
    shared machine more threads make eager timings swing by 30×)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(quick, Path(out))
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    shapes = [(16, 512, 16)] if quick else [(64, 1024, 16), (16, 4096, 64), (256, 768, 8)]
    repeats = 5 if quick else 20
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for device in devices:
        backends = ["torch", "compile"]
        if device.type == "cuda" and K.available():
            backends.append("triton")
        for shape in shapes:
            for name in OPS:
                ms = {b: _time(_make_op(name, b, shape, device), device, repeats) for b in backends}
                row = {
                    "device": _device_name(device),
                    "op": name,
                    "shape (B, n, p)": str(shape),
                    "torch ms": ms["torch"],
                    "compile ms": ms["compile"],
                    "compile / torch": ms["compile"] / ms["torch"],
                    "triton ms": ms.get("triton"),
                    "triton / torch": ms["triton"] / ms["torch"] if "triton" in ms else None,
                }
                rows.append(row)
                print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    notes = [
        "Median wall time per call. Each row was measured on the device it names; the three backends "
        "of a row ran side by side in this process.",
        "triton: measured only on a CUDA device (there is none here: empty cells)."
        if not torch.cuda.is_available()
        else "triton: measured on the GPU named in its rows.",
        "compile: torch.compile(dynamic=False) of the functional reference; compilation is excluded "
        "(warm-up calls).",
    ]
    notes.append(f"Load average at the end of the run: {os.getloadavg()[0]:.1f} (other processes share the CPU).")
    result = {"torch": torch.__version__, "quick": quick, "notes": notes, "rows": rows}
    (out / "kernels.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    cols = list(rows[0])
    fmt = lambda v: "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    md = ["# Fused kernels: torch vs torch.compile vs Triton", "", *[f"- {n}" for n in notes], "", *table, ""]
    (out / "kernels.md").write_text("\n".join(md), encoding="utf-8")
    return result
