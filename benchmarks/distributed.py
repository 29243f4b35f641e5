"""Distributed benchmark (issue 8), on paper: per-step communication and memory of a Stiefel step
on FSDP2 row shards (p×p all-reduces, ``stiefel_opt.distributed``) vs gather-then-retract.

Computed from shapes, nothing is timed. fp32 (4-byte) parameters, gradients and moments; W ranks
hold n/W rows each. Per matrix and step:

- sharded landing (LandingAdam): all-reduce of 3 p×p Grams (XᵀX, GᵀX, DᵀX), one value (‖Λ‖²_F,
  summed over the shards) and a non-finite flag byte per matrix — bounded in ``tests/test_distributed.py``
  with a patched ``dist.all_reduce``. Sharded RiemannianAdam (polar): 5 p×p Grams (two tangent projections, the
  polar Gram, its Newton–Schulz refinement, the transport) and the flag.
- gather-then-retract: all-gather X and G (n×p each) so every rank steps the whole matrix, then
  keep the local rows (what ``distributed`` does for a matrix split along its short side).

Bytes on the wire per rank: ring all-reduce 2(W−1)/W·m, all-gather (W−1)/W·m for a message of m
bytes. Step working memory per rank: the resident shard (X, G, two moments: 4·(n/W)·p) plus about
six n×p-shaped temporaries of the step — on n/W rows when sharded, on n rows when gathered (plus
the gathered X and G).

A 7B-like model (32 layers; q, k, v, o 4096→4096; gate, up 4096→11008; down 11008→4096) with a
PoLAR/StelLA adapter on every projection stores both Stiefel factors tall (out×r and in×r), so
fully_shard splits their long side: 352 matrices with n = 4096 and 96 with n = 11008.

LoRA-RITE on the same model's LoRA pairs (A r×in, B out×r, 224 pairs), per pair and step: B split
on its rows all-reduces 4 r×r Grams (its basis' two passes, its unmagnified gradient's Gram, the
basis change of A's moments) — the count ``tests/test_distributed.py`` checks; A split on r
(``fully_shard``'s default) is all-gathered with its gradient (2·r·in values); A split on ``in``
(``shard_placement_fn``) all-reduces 4 r×r Grams like B.

``python -m benchmarks distributed [--quick] [--out results]`` writes ``distributed.json`` and
``distributed.md``.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks._report import markdown_table, write_json

ITEM = 4  # fp32 bytes
NS = (4096, 11008)
PS = (8, 32, 128)
RANKS = (8, 64)
TEMPORARIES = 6
MODEL_MATRICES = {4096: 32 * 11, 11008: 32 * 3}
#: (in, out) → LoRA pairs of the 7B-like model: q, k, v, o; gate, up; down.
MODEL_PAIRS = {(4096, 4096): 32 * 4, (4096, 11008): 32 * 2, (11008, 4096): 32}
RITE_GRAMS = 4  # r×r all-reduces per sharded factor and step


def allreduce_message(p: int, optimizer: str) -> int:
    """Bytes all-reduced per matrix and step on row shards."""
    if optimizer == "landing_adam":
        return (3 * p * p + 1) * ITEM + 1
    if optimizer == "riemannian_adam_polar":
        return 5 * p * p * ITEM + 1
    raise ValueError(f"allreduce_message: unknown optimizer {optimizer!r}")


def per_matrix(n: int, p: int, world: int) -> dict:
    """Communication (bytes sent per rank) and step memory per rank for one n×p matrix."""
    local = -(-n // world)
    ring = 2 * (world - 1) / world
    gather_msg = 2 * n * p * ITEM  # X and G
    return {
        "n": n, "p": p, "ranks": world,
        "sharded_landing_msg_B": allreduce_message(p, "landing_adam"),
        "sharded_landing_wire_B": ring * allreduce_message(p, "landing_adam"),
        "sharded_riemannian_msg_B": allreduce_message(p, "riemannian_adam_polar"),
        "gather_wire_B": (world - 1) / world * gather_msg,
        "sharded_mem_B": (4 + TEMPORARIES) * local * p * ITEM + 4 * p * p * ITEM,
        "gather_mem_B": 4 * local * p * ITEM + (2 + TEMPORARIES) * n * p * ITEM,
    }


def rite_per_pair(n_in: int, n_out: int, r: int, world: int) -> dict:
    """LoRA-RITE's bytes on the wire per rank for one pair and step under FSDP2."""
    ring = 2 * (world - 1) / world
    grams = RITE_GRAMS * r * r * ITEM
    gathered = 2 * r * n_in * ITEM  # A and ∇A
    return {
        "in": n_in, "out": n_out, "r": r, "ranks": world,
        "b_allreduce_msg_B": grams,
        "a_gathered_wire_B": ring * grams + (world - 1) / world * gathered,
        "a_on_in_wire_B": ring * 2 * grams,
    }


def _fmt(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.2f} {unit}"
    return f"{b:.0f} B"


def run(quick: bool, out: Path) -> dict:
    """Write distributed.json and distributed.md under ``out`` (``quick`` changes nothing: no timing)."""
    out = Path(out)
    rows = [per_matrix(n, p, w) for w in RANKS for n in NS for p in PS]
    for r in rows:
        r["comm_ratio_gather_over_sharded"] = r["gather_wire_B"] / r["sharded_landing_wire_B"]
        r["mem_ratio_gather_over_sharded"] = r["gather_mem_B"] / r["sharded_mem_B"]
    model = []
    for w in RANKS:
        for p in PS:
            mats = [(per_matrix(n, p, w), k) for n, k in MODEL_MATRICES.items()]
            model.append({
                "p": p, "ranks": w,
                "sharded_landing_wire_B": sum(r["sharded_landing_wire_B"] * k for r, k in mats),
                "gather_wire_B": sum(r["gather_wire_B"] * k for r, k in mats),
            })
    rite = []
    for w in RANKS:
        for r in PS:
            pairs = [(rite_per_pair(i, o, r, w), k) for (i, o), k in MODEL_PAIRS.items()]
            rite.append({
                "r": r, "ranks": w,
                "b_allreduce_msg_B": pairs[0][0]["b_allreduce_msg_B"],
                "a_gathered_wire_B": sum(q["a_gathered_wire_B"] * k for q, k in pairs),
                "a_on_in_wire_B": sum(q["a_on_in_wire_B"] * k for q, k in pairs),
            })
    data = {"per_matrix": rows, "model_7b": model, "lora_rite_7b": rite, "dtype_bytes": ITEM,
            "temporaries": TEMPORARIES, "note": "computed from shapes (no timing)"}
    write_json(out / "distributed.json", data)
    table = markdown_table([
        {"ranks": r["ranks"], "n": r["n"], "p": r["p"],
         "sharded landing: all-reduce msg": _fmt(r["sharded_landing_msg_B"]),
         "on wire / rank": _fmt(r["sharded_landing_wire_B"]),
         "gather-then-retract: on wire / rank": _fmt(r["gather_wire_B"]),
         "comm ratio": f"{r['comm_ratio_gather_over_sharded']:.0f}×",
         "step memory / rank sharded": _fmt(r["sharded_mem_B"]),
         "gathered": _fmt(r["gather_mem_B"]),
         "memory ratio": f"{r['mem_ratio_gather_over_sharded']:.1f}×"}
        for r in rows
    ])
    model_table = markdown_table([
        {"ranks": m["ranks"], "p": m["p"], "sharded landing / step / rank": _fmt(m["sharded_landing_wire_B"]),
         "gather-then-retract / step / rank": _fmt(m["gather_wire_B"]),
         "ratio": f"{m['gather_wire_B'] / m['sharded_landing_wire_B']:.0f}×"}
        for m in model
    ])
    text = "\n".join([
        "# Distributed Stiefel step: sharded landing vs gather-then-retract (on paper)",
        "",
        "Computed from shapes by `benchmarks/distributed.py`; nothing here was measured. fp32, one n×p "
        "matrix row-sharded over W ranks. Sharded landing all-reduces 4 p×p Grams and a "
        "flag per matrix (independent of n and W); gather-then-retract all-gathers X and G.",
        "",
        table,
        "",
        "## 7B-like model, PoLAR/StelLA on every projection (352 matrices n = 4096, 96 with n = 11008)",
        "",
        model_table,
        "",
        "## LoRA-RITE on the same model's 224 LoRA pairs (A r×in, B out×r)",
        "",
        "B split on its rows all-reduces 4 r×r Grams per pair (the message below, independent of in, "
        "out and W). A split on r (fully_shard's default) is all-gathered with its gradient; split on "
        "in (shard_placement_fn) it all-reduces 4 r×r Grams like B.",
        "",
        markdown_table([
            {"ranks": q["ranks"], "r": q["r"], "B: all-reduce msg / pair": _fmt(q["b_allreduce_msg_B"]),
             "all pairs, A gathered: on wire / step / rank": _fmt(q["a_gathered_wire_B"]),
             "all pairs, A on in: on wire / step / rank": _fmt(q["a_on_in_wire_B"]),
             "ratio": f"{q['a_gathered_wire_B'] / q['a_on_in_wire_B']:.0f}×"}
            for q in rite
        ]),
        "",
        "Latency is not modelled: the sharded step issues a few all-reduces per bucket of equal-shape "
        "matrices (the bucket is one batched message), not per matrix.",
    ])
    (out / "distributed.md").write_text(text + "\n", encoding="utf-8")
    return data
