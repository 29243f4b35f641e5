"""The ways a user constrains a layer, side by side: whole training steps, convergence, feasibility, memory.

Methods (each on its own copy of the same model, from the same orthonormal starting point; every
other parameter gets Adam):

- ``torch orthogonal``: ``torch.nn.utils.parametrizations.orthogonal`` (its default map: matrix_exp
  for square, householder otherwise) + ``torch.optim.Adam``;
- ``geotorch orthogonal``: ``geotorch.orthogonal`` (its default, expm) + ``torch.optim.Adam``;
- ``geoopt RAdam (Euclidean)`` / ``geoopt RAdam (canonical)``: a ``geoopt.ManifoldParameter`` on
  ``geoopt.EuclideanStiefel()`` / ``geoopt.Stiefel()`` + ``geoopt.optim.RiemannianAdam``;
- the package: ``constrain(module, "weight")`` + ``RiemannianAdam``, ``LandingAdam`` or
  ``riemannian(torch.optim.AdamW(weight_decay=0))``.

Tasks:

- ``brockett n×p ×L``: L constrained ``nn.Linear(p, n, bias=False)`` weights W (n×p); the loss
  −Σ_l tr(W_lᵀ A_l W_l N) goes through the layers' forward (Z = D Wᵀ with D = diag(√N), then
  −Σ(Z A) ⊙ Z), A_l = Q_l diag(2^{−i/p}) Q_lᵀ, N = diag(1 … ½). The optimum is known in closed form:
  −Σ_l Σ_j N_j λ_j(A_l) (the top eigenvalues weighted); the gap is measured at the polar factor of
  each W (so a landing iterate off the manifold is not credited for it).
- ``orthogonal RNN (copy)``: the copy task (8 symbols to remember, a delay, a marker, then recall), an
  RNN h ← modrelu(W h + U x) with the h×h recurrent W constrained (read once per forward: what
  ``parametrize.cached()`` would do), cross-entropy on every position; the target is a loss below
  a fraction of the memoryless baseline 10·ln 8 / T.

Measured: ms per training step (forward + backward + step; median over repeats, the methods stepping
in turn, round-robin, so that drift of the machine hits them alike), steps to the target (the best of
a small Adam lr grid, :func:`lr_grid` — scaled by √(np) on geoopt's Stiefel group, whose
RiemannianAdam normalizes per matrix —, a step cap and a per-run time cap: a method that hits the cap reads "> k"), the
final ‖WᵀW − I‖_F (largest over the layers; LandingAdam also after ``optimizer.project_()``), and the
peak memory of one training step: the peak bytes of live tensors tracked by torch's
``MemTracker`` (``torch.distributed._tools.mem_tracker``, a TorchDispatchMode: parameters, gradients,
optimizer state, activations and temporaries; CPU torch has no allocator statistics and
``tracemalloc`` does not see torch's allocator; workspaces inside one LAPACK call are not counted).

``python -m benchmarks constrain [--quick] [--out results] [--threads 1]``
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks._report import (device_header, markdown_table, plot_bars, plot_lines, progress, write_json,
                                write_markdown)
import stiefel_opt as so
from stiefel_opt import functional as F
from stiefel_opt._geoopt import geoopt

METHODS = ("torch orthogonal", "geotorch orthogonal", "geoopt RAdam (Euclidean)", "geoopt RAdam (canonical)",
           "RiemannianAdam", "LandingAdam", "riemannian(AdamW)")
OURS = ("RiemannianAdam", "LandingAdam", "riemannian(AdamW)")
SHAPES = ((512, 16, 4), (256, 64, 2), (256, 256, 1))  # n, p, layers
QUICK_SHAPES = ((64, 8, 2), (32, 32, 1))
RNN = {"hidden": 128, "symbols": 8, "remember": 10, "delay": 10, "batch": 32}
QUICK_RNN = {"hidden": 32, "symbols": 4, "remember": 4, "delay": 4, "batch": 16}
LRS = (3e-3, 1e-2, 3e-2)
RNN_LRS = (1e-3, 3e-3, 1e-2)
BROCKETT_TARGET = 1e-3  # relative gap to the closed-form optimum
RNN_TARGET = 0.1  # fraction of the memoryless baseline loss


def lr_grid(task, quick: bool = False) -> tuple[float, ...]:
    """Adam's lr grid on ``task`` (every method; see :func:`build` for geoopt's Stiefel group)."""
    grid = LRS if isinstance(task, Brockett) else RNN_LRS
    return grid[1:2] if quick else grid


def _code_version() -> str:
    """The commit measured, and the package files that differed from it (a shared working tree)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--short", "--", "stiefel_opt"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = [line[3:] for line in dirty if line.strip()]
    return f"commit {head}" + (f", with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def add_arguments(parser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


# --- tasks ------------------------------------------------------------------------------------------
class Brockett:
    """L constrained n×p weights and the weighted Brockett loss; closed-form optimum."""

    def __init__(self, n: int, p: int, layers: int, seed: int = 0):
        self.n, self.p, self.layers = n, p, layers
        self.name = f"brockett {n}×{p} ×{layers}"
        self.matrix = (n, p)
        gen = torch.Generator().manual_seed(seed)
        lam = 2.0 ** (-torch.arange(n, dtype=torch.float64) / p)
        weights = torch.linspace(1.0, 0.5, p, dtype=torch.float64)
        self.a = []
        for _ in range(layers):
            q = F.random_point(n, n, dtype=torch.float64, generator=gen)
            self.a.append(((q * lam) @ q.T).float())
        self.d = torch.diag(weights.sqrt()).float()
        self.optimum = -float(layers * (weights * lam[:p]).sum())
        self.x0 = [F.random_point(n, p, generator=gen) for _ in range(layers)]

    def model(self) -> nn.Module:
        layers = nn.ModuleList(nn.Linear(self.p, self.n, bias=False) for _ in range(self.layers))
        with torch.no_grad():
            for lin, x in zip(layers, self.x0):
                lin.weight.copy_(x)
        return layers

    @staticmethod
    def constrained(model) -> list[nn.Module]:
        return list(model)

    def loss(self, model) -> torch.Tensor:
        total = 0.0
        for lin, a in zip(model, self.a):
            z = lin(self.d)  # D Wᵀ: p×n
            total = total - ((z @ a) * z).sum()
        return total

    @torch.no_grad()
    def gap(self, model) -> float:
        """Relative gap to the optimum of the loss at the polar factors of the weights."""
        total = 0.0
        for lin, a in zip(model, self.a):
            w = F.project(lin.weight.detach().double())
            z = self.d.double() @ w.T
            total -= float(((z @ a.double()) * z).sum())
        return (total - self.optimum) / abs(self.optimum)


class _ModReLU(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.b = nn.Parameter(torch.full((h,), -0.01))

    def forward(self, z):
        return torch.sign(z) * torch.relu(z.abs() + self.b)


class _OrthoRNN(nn.Module):
    def __init__(self, h: int, symbols: int):
        super().__init__()
        self.inp = nn.Linear(symbols + 2, h)
        self.rec = nn.Linear(h, h, bias=False)
        self.act = _ModReLU(h)
        self.out = nn.Linear(h, symbols + 1)

    def forward(self, x):  # x: (T, B, symbols + 2) one-hot
        w = self.rec.weight  # read once (parametrize.cached() would do the same)
        u = self.inp(x)
        h = torch.zeros(x.shape[1], w.shape[0])
        outs = []
        for t in range(x.shape[0]):
            h = self.act(u[t] + h @ w.T)
            outs.append(h)
        return self.out(torch.stack(outs))


class CopyTask:
    """Copy task: ``remember`` symbols of ``symbols``, ``delay`` blanks, a marker, recall."""

    def __init__(self, hidden: int, symbols: int, remember: int, delay: int, batch: int, seed: int = 0):
        self.name = f"orthogonal RNN (copy, h={hidden}, T={2 * remember + delay})"
        self.matrix = (hidden, hidden)
        self.h, self.k, self.r, self.delay, self.batch = hidden, symbols, remember, delay, batch
        self.length = 2 * remember + delay
        self.baseline = remember * math.log(symbols) / self.length
        self.gen = torch.Generator().manual_seed(seed)
        self.x0 = F.random_point(hidden, hidden, generator=torch.Generator().manual_seed(seed + 1))
        self.init = _OrthoRNN(hidden, symbols)
        with torch.no_grad():
            self.init.rec.weight.copy_(self.x0)
        self.batches: list = []

    def _batch(self, i: int):
        while len(self.batches) <= i:
            seq = torch.randint(1, self.k + 1, (self.batch, self.r), generator=self.gen)
            marker = self.k + 1  # inputs: 0 blank, 1…k symbols, k + 1 the recall marker
            inp = torch.zeros(self.batch, self.length, dtype=torch.long)
            inp[:, : self.r] = seq
            inp[:, self.r + self.delay - 1] = marker
            target = torch.zeros(self.batch, self.length, dtype=torch.long)
            target[:, -self.r:] = seq
            x = nn.functional.one_hot(inp, self.k + 2).float().transpose(0, 1)
            self.batches.append((x, target.T))
        return self.batches[i]

    def model(self) -> nn.Module:
        return copy.deepcopy(self.init)

    @staticmethod
    def constrained(model) -> list[nn.Module]:
        return [model.rec]

    def loss(self, model, i: int = 0) -> torch.Tensor:
        x, target = self._batch(i)
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


# --- methods ------------------------------------------------------------------------------------------
def build(method: str, task, lr: float):
    """(model, optimizer) of ``method`` on a fresh copy of ``task``'s model."""
    model = task.model()
    layers = task.constrained(model)
    if method == "torch orthogonal":
        for lin in layers:
            w = lin.weight.detach().clone()
            nn.utils.parametrizations.orthogonal(lin, "weight")
            with torch.no_grad():
                lin.weight = w
        return model, torch.optim.Adam(model.parameters(), lr=lr)
    if method == "geotorch orthogonal":
        import geotorch

        for lin in layers:
            w = lin.weight.detach().clone()
            geotorch.orthogonal(lin, "weight")
            lin.weight = w
        return model, torch.optim.Adam(model.parameters(), lr=lr)
    if method.startswith("geoopt"):
        # geoopt's RiemannianAdam divides by the root of one second moment per Stiefel matrix, the squares
        # *summed* over its np entries (geoopt's inner product), so its per-entry step is ~lr/√(np): the
        # Stiefel group gets lr·√(np), the same per-entry step as the others (the rest: lr, plain Adam)
        manifold = geoopt.EuclideanStiefel() if "Euclidean" in method else geoopt.Stiefel()
        for lin in layers:
            lin.weight = geoopt.ManifoldParameter(lin.weight.detach().clone(), manifold=manifold)
        stiefel = [lin.weight for lin in layers]
        rest = [q for q in model.parameters() if all(q is not w for w in stiefel)]
        groups = [{"params": stiefel, "lr": lr * math.sqrt(math.prod(task.matrix))}]
        if rest:
            groups.append({"params": rest})
        return model, geoopt.optim.RiemannianAdam(groups, lr=lr)
    for lin in layers:
        so.constrain(lin, "weight", init="keep")
    if method == "RiemannianAdam":
        return model, so.RiemannianAdam(model.parameters(), lr=lr)
    if method == "LandingAdam":
        return model, so.LandingAdam(model.parameters(), lr=lr)
    if method == "riemannian(AdamW)":
        return model, so.riemannian(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def _step(task, model, opt, i: int = 0) -> float:
    loss = task.loss(model, i) if isinstance(task, CopyTask) else task.loss(model)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def feasibility(task, model) -> float:
    return max(so.feasibility(lin.weight.detach().double()) for lin in task.constrained(model))


def time_steps(task, methods, warmup: int, repeats: int) -> dict:
    """Median ms per training step of each method (at the middle lr of its grid), the methods stepping
    in turn."""
    runs = {m: build(m, task, lr_grid(task)[1]) for m in methods}
    times = {m: [] for m in methods}
    for r in range(warmup + repeats):
        for m, (model, opt) in runs.items():
            t0 = time.perf_counter()
            _step(task, model, opt, r)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[m].append(dt)
    return {m: 1e3 * sorted(t)[len(t) // 2] for m, t in times.items()}


def peak_memory_mib(task, method: str) -> float | None:
    """Peak MiB of live tensors during one training step (after a first step created the state)."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    model, opt = build(method, task, lr_grid(task)[1])
    _step(task, model, opt)
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        _step(task, model, opt, 1)
    snap = tracker.get_tracker_snapshot("peak")
    return sum(v["Total"] for v in snap.values()) / 2**20


def converge(task, method: str, lr: float, max_steps: int, time_cap: float, target: float) -> dict:
    """One training run: the metric per step (relative gap, or loss ÷ baseline for the RNN), the first
    step at or below ``target``, final feasibility (and after ``project_()`` for LandingAdam)."""
    model, opt = build(method, task, lr)
    curve, hit, t0 = [], None, time.perf_counter()
    capped = False
    for i in range(max_steps):
        loss = _step(task, model, opt, i)
        metric = task.gap(model) if isinstance(task, Brockett) else loss / task.baseline
        if not math.isfinite(metric):
            break
        curve.append(metric)
        if isinstance(task, CopyTask) and len(curve) >= 10:
            metric = sum(curve[-10:]) / 10  # the mean of the last 10 batches
        if hit is None and metric <= target:
            hit = i + 1
            break
        if time.perf_counter() - t0 > time_cap:
            capped = True
            break
    d = feasibility(task, model)
    d_projected = None
    if hasattr(opt, "project_") and method == "LandingAdam":
        opt.project_()
        d_projected = feasibility(task, model)
    return {"lr": lr, "steps": hit, "ran": len(curve), "capped": capped and hit is None, "curve": curve,
            "final_d": d, "d_after_project": d_projected}


def best_run(runs: list[dict]) -> dict:
    """The run that reached the target first; if none did, the one that ended lowest."""
    reached = [r for r in runs if r["steps"] is not None]
    if reached:
        return min(reached, key=lambda r: r["steps"])
    return min(runs, key=lambda r: r["curve"][-1] if r["curve"] else math.inf)


def _steps_cell(r: dict) -> str:
    if r["steps"] is not None:
        return f"{r['steps']} (lr {r['lr']:g})"
    why = "time cap" if r["capped"] else "step cap" if r["curve"] else "diverged"
    return f"> {r['ran']} ({why})"


def run(quick: bool = False, out: Path = Path("results/constrain"), threads: int = 1) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = QUICK_SHAPES if quick else SHAPES
    warmup, repeats = (1, 3) if quick else (2, 15)
    max_steps, time_cap = (40, 5.0) if quick else (400, 15.0)
    rnn_steps, rnn_cap = (30, 5.0) if quick else (400, 20.0)
    tasks = [Brockett(n, p, layers) for n, p, layers in shapes]
    tasks.append(CopyTask(**(QUICK_RNN if quick else RNN)))
    results = {}
    t_start = time.perf_counter()
    for task in progress(tasks, desc="constrain"):
        brockett = isinstance(task, Brockett)
        ms = time_steps(task, METHODS, warmup, repeats)
        mem = {m: peak_memory_mib(task, m) for m in METHODS}
        conv = {}
        for m in METHODS:
            runs = [converge(task, m, lr, max_steps if brockett else rnn_steps, time_cap if brockett else rnn_cap,
                             BROCKETT_TARGET if brockett else RNN_TARGET) for lr in lr_grid(task, quick)]
            conv[m] = {"best": best_run(runs), "runs": runs}
        results[task.name] = {"ms": ms, "peak_MiB": mem, "convergence": conv,
                              "target": BROCKETT_TARGET if brockett else RNN_TARGET,
                              "metric": "relative gap to the optimum" if brockett else "loss ÷ memoryless baseline"}
    header = device_header("cpu")
    rows = []
    for name, res in results.items():
        fastest = min(res["ms"].values())
        for m in METHODS:
            b = res["convergence"][m]["best"]
            rows.append({
                "task": name, "method": m, "ms/step": round(res["ms"][m], 2),
                "÷ fastest": round(res["ms"][m] / fastest, 2),
                "steps to target": _steps_cell(b),
                "time to target (s)": None if b["steps"] is None else round(b["steps"] * res["ms"][m] / 1e3, 2),
                "final ‖WᵀW − I‖_F": b["final_d"],
                "after project_()": b["d_after_project"],
                "peak MiB": res["peak_MiB"][m],
            })
    data = {"device": header, "code": _code_version(), "quick": quick, "threads": threads, "warmup": warmup, "repeats": repeats,
            "lrs": list(LRS), "rnn_lrs": list(RNN_LRS), "max_steps": max_steps, "time_cap_s": time_cap, "rnn_steps": rnn_steps,
            "rnn_time_cap_s": rnn_cap, "brockett_target": BROCKETT_TARGET, "rnn_target": RNN_TARGET,
            "wall_s": time.perf_counter() - t_start, "results": results, "rows": rows}
    write_json(out / "constrain.json", data)
    table = markdown_table(rows)
    write_markdown(out / "constrain.md", "Constraining a layer: parametrizations, geoopt and the package", [
        f"Code: {data['code']}. {threads} thread(s). A training step = forward + backward + step; median ms over {repeats} steps, the "
        "methods stepping in turn (round-robin) in one process; `÷ fastest`: this / the fastest method on the "
        f"task. Steps to target: relative gap to the closed-form optimum ≤ {BROCKETT_TARGET:g} (Brockett; gap "
        f"measured at the polar factor of each W) or the mean loss of the last 10 batches ≤ {RNN_TARGET:g} × "
        f"the memoryless baseline (copy task); the best of Adam's lr ∈ {{{', '.join(f'{x:g}' for x in LRS)}}} "
        f"(Brockett) or {{{', '.join(f'{x:g}' for x in RNN_LRS)}}} (RNN), times √(np) on geoopt's Stiefel "
        "group (its RiemannianAdam normalizes by one second moment per matrix, summed over the np entries); "
        f"at most {max_steps} steps / {time_cap:g} s per Brockett run and {rnn_steps} steps / "
        f"{rnn_cap:g} s per RNN run (\"> k (time cap)\": the run was stopped after k steps). Time to target = "
        "steps × ms/step. ‖WᵀW − I‖_F: at the end of that run (largest over the layers, in fp64); LandingAdam "
        "also after `optimizer.project_()`. Peak MiB: peak bytes of live tensors during one training step "
        "(torch's MemTracker, a TorchDispatchMode; CPU torch keeps no allocator statistics).",
        table,
    ])
    for name, res in results.items():
        series = {}
        for m in METHODS:
            curve = res["convergence"][m]["best"]["curve"]
            if curve:
                series[f"{m} (lr {res['convergence'][m]['best']['lr']:g})"] = (
                    range(1, len(curve) + 1), [max(c, 1e-12) for c in curve])
        slug = name.split(" (")[0].replace(" ", "_").replace("×", "x")
        plot_lines(out / f"constrain_{slug}.png", series, f"{name}; {threads} thread(s)", "step", res["metric"],
                   logy=True, hline=res["target"])
    _plot_ms(results, out / "constrain_ms.png", header)
    print(header)
    print(table)
    return data


def _plot_ms(results: dict, path: Path, header: str) -> None:
    tasks = list(results)
    plot_bars(path, tasks, {m: [results[t]["ms"][m] for t in tasks] for m in METHODS}, header,
              "ms per training step (log)")
