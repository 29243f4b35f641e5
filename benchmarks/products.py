"""The two ways to add a batched product into a stack, C ← βC + αA·B with A (B, n, k) and B (B, k, r),
timed side by side in one process: one ``baddbmm`` (β ≠ 0: the accumulation in the BLAS call), and a
product (``baddbmm`` with β = 0) followed by an ``add_``. The Stiefel steps add n×p-by-p×p products
into n×p stacks (rgrad, the polar step's Y, the transport, the landing field); which way is faster
depends on k·r and the number of rows, and ``stiefel_opt.functional.layout._accumulates_slowly``
takes the split where this table measured it faster. Reported: µs per call and split ÷ one baddbmm
(< 1: the split is faster), and the way the package takes.

``python -m benchmarks products [--quick] [--out results]``
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks._report import device_header, markdown_table, progress, write_json, write_markdown
from stiefel_opt.functional.layout import _accumulates_slowly

GRID = [(count, n, p) for count in (4, 32) for p in (4, 8, 16, 32) for n in (256, 512, 1024, 4096)]
QUICK_GRID = [(4, 512, 4), (4, 4096, 4), (32, 768, 8), (4, 4096, 32)]


def _median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * sorted(times)[len(times) // 2]


def measure(count: int, n: int, p: int, device, repeats: int) -> dict:
    """µs of C ← C − ½A·B (A n×p, B p×p, in place) both ways, alternating call by call."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(count, n, p, generator=gen).to(device), torch.randn(count, p, p, generator=gen).to(device)
    c = torch.randn(count, n, p, generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fused():
        c.baddbmm_(a, b, alpha=-0.5)
        sync()

    def split():
        c.add_(torch.baddbmm(c, a, b, beta=0.0, alpha=-0.5))
        sync()

    one, two = [], []
    for _ in range(3):  # interleaved rounds: drift of the machine hits both alike
        one.append(_median_us(fused, repeats))
        two.append(_median_us(split, repeats))
    t_one, t_two = min(one), min(two)
    return {"count": count, "n": n, "p": p, "baddbmm_us": t_one, "split_us": t_two, "split_ratio": t_two / t_one,
            "package_splits": _accumulates_slowly(a, b)}


def run(quick: bool = False, out: Path = Path("results/products")) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [measure(*shape, device, 20 if quick else 200) for shape in progress(QUICK_GRID if quick else GRID,
                                                                                desc="products")]
    table = markdown_table([{"count × (n × p)": f"{r['count']}×({r['n']}×{r['p']})",
                             "baddbmm µs": f"{r['baddbmm_us']:.1f}", "product + add µs": f"{r['split_us']:.1f}",
                             "split ÷ baddbmm": f"{r['split_ratio']:.2f}",
                             "package takes": "split" if r["package_splits"] else "baddbmm"} for r in rows])
    write_json(out / "products.json", {"device": device_header(device), "rows": rows})
    write_markdown(out / "products.md", "Adding a product into a stack: one baddbmm or a product then an add",
                   [table], device)
    return {"rows": rows}
