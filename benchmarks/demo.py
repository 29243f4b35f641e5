"""The main job (``make demo``): a short fine-tuning comparison and the factorization problem.

1. Fine-tune MiniLM-L6 on the shipped WordNet glosses with LoRA (AdamW), PoLAR (official recipe),
   PoLAR + LandingAdam and StelLA (official recipe) — rank 8, adapters on query/value of the top
   two layers, the same budget, schedule and clipping — each at the lr the full ``finetune`` grid
   selected for it on its validation split (``finetune.SELECTED_LRS``; a method missing there has
   its lr selected here on validation, from the grid's lrs).
2. PoLAR's low-rank factorization problem on the quick grid (BM+GD vs PoLAR RGD/landing and the
   preconditioned fix).
Prints one table (accuracy, stable rank, seconds per step) and writes everything under
``results/demo``; ``--quick`` shortens both parts (a smoke run, not for reading numbers off).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from . import factorization, finetune
from ._report import device_header, markdown_table, write_json, write_markdown

FINETUNE = finetune.Setting(
    methods=finetune.DEMO_METHODS, ranks=(8,), seeds=(0, 1), steps=250, n_train=4_000, n_val=500, n_test=1_000,
    log_every=25, fixed_lrs=tuple((m, finetune.SELECTED_LRS[m]) for m in finetune.DEMO_METHODS if m in finetune.SELECTED_LRS))
FACTORIZATION = factorization.QUICK


def run(quick: bool = False, out: Path = Path("results/demo")) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    ft_setting, fz_grid = FINETUNE, FACTORIZATION
    if quick:
        ft_setting = dataclasses.replace(FINETUNE, seeds=(0,), steps=40, n_train=1_000, n_val=200, n_test=500,
                                         log_every=10)
        fz_grid = dataclasses.replace(FACTORIZATION, cap=500)
    print(device_header())
    print("[1/2] fine-tuning MiniLM-L6 on WordNet glosses")
    ft = finetune.run(out=out / "finetune", setting=ft_setting)
    print("[2/2] low-rank factorization (PoLAR Fig. 3 problem)")
    fz = factorization.run(out=out / "factorization", grid=fz_grid)
    rows = [{k: v for k, v in row.items() if k not in ("r", "seeds")} for row in ft["rows"]]
    ft_table = markdown_table(rows)
    fz_table = factorization.pivot_table(fz["rows"], fz_grid)
    seconds = time.perf_counter() - t0
    lrs = ", ".join(f"{row['method']} {row['lr']:g}" for row in ft["rows"])
    intro = (
        f"Fine-tuning: MiniLM-L6, r = 8, adapters on query/value of the top {ft_setting.top} layers, "
        f"{ft_setting.steps} steps of batch {ft_setting.batch_size}, cosine schedule with 3% warm-up, gradient "
        f"norm clipped to 1, lora_alpha = 32 (StelLA: its official s = α/r = 2); {ft_setting.n_train} train / "
        f"{ft_setting.n_test} test WordNet glosses (10 classes), seeds {list(ft_setting.seeds)}. Each method runs at "
        f"the lr the full `finetune` grid selected for it on a validation split ({lrs}); `val acc` is this run's "
        f"{ft_setting.n_val} held-out train glosses. Stable rank ‖M‖_F²/‖M‖₂², median over the "
        f"{2 * ft_setting.top} adapted matrices, of the adapter's ΔW and of the learned update ΔW−ΔW₀ (they differ "
        "only for StelLA, whose ΔW₀ = s·U S₀ Vᵀ ≠ 0); max ‖XᵀX−I‖ over its Stiefel factors (0: none)."
    )
    fz_intro = (
        f"Factorization ½‖M − A‖², n = {fz_grid.sizes[0]}, rank(A) = {fz_grid.rank_a}, σ from 1 to 1/κ: "
        f"iterations to relative error {fz_grid.target:g} with each method's tuned step (>{fz_grid.cap}: not "
        "reached). The full grid is `python -m benchmarks factorization`."
    )
    write_markdown(out / "demo.md", "stiefel_opt demo", [intro, ft_table, fz_intro, fz_table, f"Total {seconds:.0f} s."])
    write_json(out / "demo.json", {"header": device_header(), "finetune": rows, "factorization": fz["rows"], "seconds": seconds})
    print()
    print(ft_table)
    print(fz_table)
    print(f"demo finished in {seconds:.0f} s; results and plots under {out}/")
    return {"finetune": rows, "factorization": fz["rows"], "seconds": seconds}
