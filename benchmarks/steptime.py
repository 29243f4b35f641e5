"""Optimizer step time on Stiefel parameter mixes, as ratios measured side by side in one process.

For each mix (count × (n × p)) the step of every optimizer of the package is timed on Stiefel
parameters, next to ``torch.optim.Adam(foreach=True)`` on unconstrained parameters of the same
shapes and geoopt's ``RiemannianAdam`` on the same Stiefel matrices (EuclideanStiefel, QR).
Gradients are fixed; ``step()`` alone is timed (median over repeats, the optimizers of a mix stepping
in turn, round-robin, so that drift of the machine hits them alike; the first steps, which compile
for ``compile=True``, are warm-up). Reported: ms per step,
ratio to torch Adam, speed-up over geoopt, optimizer-state bytes, and the peak memory of a step
(CUDA only: on CPU torch has no allocator statistics, so the column reads "n/a (CPU)").

Scaling: ``COUNT`` matrices of n × p, over n at fixed p (``SCALE_N``), over p at fixed n (``SCALE_P``,
n = 4096, and ``SCALE_P_TO_N``, p from 4 to n = 512) and over square n = p (``SCALE_SQUARE``), for
torch Adam(foreach), LandingAdam, RiemannianAdam, geoopt's RiemannianAdam and LandingAdam's matrix
products alone (the association the step takes at that shape,
``stiefel_opt.functional._landing_association``). At each point they step in turn, round-robin,
so that drift of the machine hits them alike; plotted as ms per step against n, p and n = p (log-log).

``--before PATH``: a checkout of an earlier version of the repository (e.g. ``git worktree add
/tmp/before <commit>``); its package is imported next to this one (as ``stiefel_opt_before``) and its
optimizers step in the same round-robin, as rows and columns suffixed " (before)": before/after
ratios measured side by side in one process.

``python -m benchmarks steptime [--quick] [--out results] [--before PATH]``
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

import stiefel_opt
from benchmarks._report import (device_header, markdown_table, plot_bars, plot_lines, progress, write_json,
                                write_markdown)
from stiefel_opt import functional as F
from stiefel_opt._geoopt import geoopt

MIXES = [(16, 4096, 32), (64, 1024, 16), (32, 768, 8)]
COUNT = 4  # matrices per scaling point
SCALE_N = {"p": 16, "n": (256, 512, 1024, 2048, 4096, 8192, 16384)}
SCALE_P = {"n": 4096, "p": (4, 8, 16, 32, 64, 128, 256)}
SCALE_P_TO_N = {"n": 512, "p": (4, 8, 16, 32, 64, 128, 256, 512)}
SCALE_SQUARE = {"n=p": (32, 64, 128, 256, 512)}
SCALE_COUNT = {"n": 512, "p": 4, "count": (1, 2, 4, 8, 16, 32)}  # how many matrices, at the thinnest point
QUICK_SCALE_N = {"p": 16, "n": (256, 2048, 16384)}
QUICK_SCALE_P = {"n": 4096, "p": (4, 32, 256)}
QUICK_SCALE_P_TO_N = {"n": 512, "p": (4, 64, 512)}
QUICK_SCALE_SQUARE = {"n=p": (64, 256, 512)}
QUICK_SCALE_COUNT = {"n": 512, "p": 4, "count": (1, 4, 16)}
FLOOR = "LandingAdam's matrix products alone"
SCALING = ("torch Adam (foreach, unconstrained)", "LandingAdam", "RiemannianAdam", "geoopt RiemannianAdam", FLOOR)
BEFORE = " (before)"
_BEFORE_PKG = None  # the earlier package loaded by --before


def add_arguments(parser) -> None:
    parser.add_argument("--before", type=Path, default=None,
                        help="repository checkout of an earlier version: its optimizers step side by side")


def load_before(path: Path):
    """Import the package of the checkout at ``path`` as ``stiefel_opt_before`` (its relative imports
    stay inside it; the fused kernels, CUDA only, are this package's) and use it for " (before)" rows."""
    global _BEFORE_PKG
    name = "stiefel_opt_before"
    root = Path(path) / "stiefel_opt"
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.modules[f"{name}.kernels"] = stiefel_opt.kernels
    spec.loader.exec_module(mod)
    _BEFORE_PKG = mod
    return mod


def _with_before(names) -> list:
    """``names`` followed by the " (before)" twin of each package optimizer (and of the floor)."""
    if _BEFORE_PKG is None:
        return list(names)
    ours = [n for n in names if not n.startswith(("torch Adam", "geoopt"))]
    return list(names) + [n + BEFORE for n in ours]


def _optimizers(pkg=stiefel_opt):
    RiemannianSGD, RiemannianAdam, LandingSGD, LandingAdam = (pkg.RiemannianSGD, pkg.RiemannianAdam,
                                                              pkg.LandingSGD, pkg.LandingAdam)
    riemannian, landing = pkg.riemannian, pkg.landing
    return {
        "torch Adam (foreach, unconstrained)": None,
        "geoopt RiemannianAdam": None,
        "RiemannianSGD (momentum 0.9)": lambda ps: RiemannianSGD(ps, lr=1e-3, momentum=0.9),
        "RiemannianAdam": lambda ps: RiemannianAdam(ps, lr=1e-3),
        "LandingSGD (momentum 0.9)": lambda ps: LandingSGD(ps, lr=1e-3, momentum=0.9),
        "LandingAdam": lambda ps: LandingAdam(ps, lr=1e-3),
        "LandingAdam (compile=True)": lambda ps: LandingAdam(ps, lr=1e-3, compile=True),
        "riemannian(AdamW)": lambda ps: riemannian(torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        "landing(Adam)": lambda ps: landing(torch.optim.Adam(ps, lr=1e-3, foreach=True)),
        FLOOR: None,
    }


class _ProductFloor:
    """The n-sized matrix products of a LandingAdam step on the stacked matrices and nothing else:
    what any implementation of that association pays on this machine before its element-wise work.

    The association is the one the installed package takes at this shape
    (``functional._landing_association``; a package without it has the thin one of six products,
    Xᵀ[X G], [G X]·C, UᵀX, UᵀU, X·K_X, U·K_U: 16np² flops a matrix):
    ``small`` (p ≤ 32, in earlier versions, which formed no Λ there): the six of the thin one above; ``thin``: XᵀX, GᵀX, G·C, X·C, DᵀX, D·C, X·C
    (14np²); ``square`` (n = p): XXᵀ, GXᵀ, W·X, DXᵀ,
    B·X (10n³); ``mid``: XᵀX, GXᵀ, W·X, DXᵀ, B·X, X·C (8n²p + 4np²)."""

    def __init__(self, count: int, n: int, p: int, device, F=F):
        gen = torch.Generator().manual_seed(0)
        self.x = F.random_point(count, n, p, generator=gen).to(device)
        self.g = torch.randn(count, n, p, generator=gen).to(device)
        self.xg = torch.cat([self.x, self.g], -1)
        self.coef = torch.randn(count, 2 * p, p, generator=gen).to(device)
        assoc = getattr(F, "_landing_association", None)
        self.route = "six" if assoc is None else assoc(n, p)
        self.state: dict = {}

    def step(self) -> None:
        x, g, c = self.x, self.g, self.coef[..., : self.x.shape[-1], :]
        if self.route in ("six", "small"):
            s = F.gram(x, self.xg)
            u = self.xg @ self.coef
            k = F.gram(u, x) + F.gram(u, u)
            (x @ k).add_(u @ s[..., : x.shape[-1]])
        elif self.route == "thin":
            xtx, gtx = F.gram(x, x), F.gram(g, x)
            t = (g @ xtx).baddbmm_(x, gtx)
            dtx = F.gram(t, x)
            (t @ c).baddbmm_(x, dtx)
        elif self.route == "square":
            e = x @ x.mT
            w = g @ x.mT
            t = w @ x
            b = t @ x.mT
            (b + e) @ x
        else:
            xtx = F.gram(x, x)
            t = (g @ x.mT) @ x
            ((t @ x.mT) @ x).baddbmm_(x, xtx)


def _params(count, n, p, kind, device, pkg=stiefel_opt):
    gen = torch.Generator().manual_seed(0)
    xs = F.random_point(count, n, p, generator=gen)
    grads = torch.randn(count, n, p, generator=gen) * 1e-2
    if kind == "plain":
        ps = [torch.nn.Parameter(x.clone().to(device)) for x in xs]
    elif kind == "geoopt":
        m = geoopt.EuclideanStiefel()
        ps = [geoopt.ManifoldParameter(x.clone().to(device), manifold=m) for x in xs]
    else:
        ps = [pkg.StiefelParameter(x.clone().to(device), check=False) for x in xs]
    for prm, g in zip(ps, grads):
        prm.grad = g.clone().to(device)
    return ps


def _make(name: str, count: int, n: int, p: int, device):
    """Optimizer ``name`` of ``_optimizers()`` on fresh parameters (fixed gradients) of shape count × (n × p)."""
    if name.startswith("torch Adam"):
        return torch.optim.Adam(_params(count, n, p, "plain", device), lr=1e-3, foreach=True)
    if name.startswith("geoopt"):
        return geoopt.optim.RiemannianAdam(_params(count, n, p, "geoopt", device), lr=1e-3)
    pkg = stiefel_opt
    if name.endswith(BEFORE):
        name, pkg = name[: -len(BEFORE)], _BEFORE_PKG
    if name == FLOOR:
        return _ProductFloor(count, n, p, device, pkg.functional)
    return _optimizers(pkg)[name](_params(count, n, p, "stiefel", device, pkg))


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


def _peak_mib(opt, device) -> float | None:
    """Peak allocated MiB during one more ``step()`` (CUDA only: on CPU torch keeps no allocator statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


def run(quick: bool = False, out: Path = Path("results/steptime"), before: Path | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if before is not None:
        load_before(before)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warmup, repeats = (1, 5) if quick else (5, 30)
    makers = _with_before(_optimizers())
    rows, results = [], {}
    for count, n, p in progress(MIXES, desc="steptime"):
        mix = f"{count}×({n}×{p})"
        opts = {name: _make(name, count, n, p, device) for name in makers}
        ms = _time_round_robin(opts, device, warmup, repeats)
        results[mix] = {name: {"ms": ms[name], "state_MiB": _state_bytes(opt) / 2**20,
                               "peak_MiB": _peak_mib(opt, device)} for name, opt in opts.items()}
    for mix, res in results.items():
        base = res["torch Adam (foreach, unconstrained)"]["ms"]
        geo = res["geoopt RiemannianAdam"]["ms"]
        order = [n for n in res if not n.endswith(BEFORE)]
        order = [m for n in order for m in (n, n + BEFORE) if m in res]  # each twin after its optimizer
        for name in order:
            r = res[name]
            r["x_torch_adam"] = r["ms"] / base
            r["geoopt_speedup"] = geo / r["ms"]
            row = {
                "mix": mix, "optimizer": name, "ms/step": round(r["ms"], 3),
                "÷ torch Adam": round(r["x_torch_adam"], 2), "geoopt RAdam ÷ this": round(r["geoopt_speedup"], 2),
                "state MiB": round(r["state_MiB"], 1),
                "peak MiB": "n/a (CPU)" if r["peak_MiB"] is None else round(r["peak_MiB"], 1),
            }
            if _BEFORE_PKG is not None:
                twin = res.get(name + BEFORE)
                r["before_speedup"] = None if twin is None else twin["ms"] / r["ms"]
                row["before ÷ this"] = "" if twin is None else round(r["before_speedup"], 2)
            rows.append(row)
    header = device_header(device)
    over_n = scaling("n", QUICK_SCALE_N if quick else SCALE_N, device, warmup, repeats)
    over_p = scaling("p", QUICK_SCALE_P if quick else SCALE_P, device, warmup, repeats)
    over_pn = scaling("p", QUICK_SCALE_P_TO_N if quick else SCALE_P_TO_N, device, warmup, repeats)
    over_sq = scaling("n=p", QUICK_SCALE_SQUARE if quick else SCALE_SQUARE, device, warmup, repeats)
    over_k = scaling("count", QUICK_SCALE_COUNT if quick else SCALE_COUNT, device, warmup, repeats)
    overs = [over_n, over_p, over_pn, over_sq, over_k]
    data = {"device": header, "quick": quick, "warmup": warmup, "repeats": repeats, "results": results,
            "scaling_n": over_n, "scaling_p": over_p, "scaling_p_to_n": over_pn, "scaling_square": over_sq,
            "scaling_count": over_k}
    write_json(out / "steptime.json", data)
    table = markdown_table(rows)
    scale_n, scale_p = scaling_table(over_n), scaling_table(over_p)
    scale_pn, scale_sq, scale_k = scaling_table(over_pn), scaling_table(over_sq), scaling_table(over_k)
    write_markdown(out / "steptime.md", "Optimizer step time", [
        "Median ms per `step()` with fixed gradients; ratios measured side by side in one process. "
        "`÷ torch Adam`: this step / torch Adam(foreach) on unconstrained parameters of the same shapes. "
        "`geoopt RAdam ÷ this`: speed-up over geoopt's RiemannianAdam on the same Stiefel matrices.",
        table,
        f"## Scaling over n ({COUNT} matrices n × {over_n['fixed']['p']})",
        "Median ms per `step()`; the optimizers step in turn at each point. In brackets: ÷ torch Adam.",
        scale_n,
        f"## Scaling over p ({COUNT} matrices {over_p['fixed']['n']} × p)",
        scale_p,
        f"## Scaling over p up to n ({COUNT} matrices {over_pn['fixed']['n']} × p)",
        scale_pn,
        f"## Square matrices ({COUNT} matrices n × n)",
        scale_sq,
        f"## Scaling over the number of matrices ({over_k['fixed']['n']} × {over_k['fixed']['p']})",
        "The fixed cost of a step (one bucket: its stacking, checks and certificates) against geoopt's "
        "per-matrix loop.",
        scale_k,
        "## geoopt RiemannianAdam ÷ this, every scaling point",
        "Speed-up over geoopt's RiemannianAdam measured side by side at each point of the tables above "
        "(> 1: faster than geoopt); `÷ floor`: LandingAdam ÷ its matrix products alone.",
        geoopt_table(overs),
    ], device=device.type)
    _plot(results, out / "steptime.png", header)
    for over, stem in zip(overs, ("n", "p", "p_to_n", "square", "count")):
        x = over["axis"]
        fixed = ", ".join(f"{k} = {v}" for k, v in over["fixed"].items()) or "n = p"
        count = "" if x == "count" else f"{COUNT} matrices, "
        plot_lines(out / f"steptime_scaling_{stem}.png",
                   {name: (over["values"], ms) for name, ms in over["ms"].items()},
                   f"{count}{fixed}; {device.type}, {torch.get_num_threads()} thread(s)", x, "ms per step", logx=True, logy=True)
    print(header)
    for text in (table, scale_n, scale_p, scale_pn, scale_sq, scale_k, geoopt_table(overs)):
        print(text)
    return data


def scaling(axis: str, grid: dict, device, warmup: int, repeats: int, names=SCALING, count: int = COUNT) -> dict:
    """Median ms per step of ``names`` over ``grid[axis]`` (the other dimension fixed), round-robin timed."""
    fixed = {k: v for k, v in grid.items() if k != axis}
    names = _with_before(names)
    ms = {name: [] for name in names}
    for v in progress(grid[axis], desc=f"steptime scaling over {axis}"):
        shape = {"count": count, **fixed, **{k: v for k in axis.split("=")}}  # axis "n=p": square
        opts = {name: _make(name, shape["count"], shape["n"], shape["p"], device) for name in names}
        for res_name, t in _time_round_robin(opts, device, warmup, repeats).items():
            ms[res_name].append(t)
    return {"axis": axis, "values": list(grid[axis]), "fixed": fixed, "count": count, "ms": ms}


def _time_round_robin(opts: dict, device, warmup: int, repeats: int) -> dict:
    """Median ms per ``step()`` of each optimizer, the optimizers stepping in turn."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    sync()
    times = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}


def scaling_table(over: dict) -> str:
    """One row per grid value, one column per optimizer: ms per step (÷ torch Adam)."""
    names = list(over["ms"])
    base = over["ms"][names[0]]
    rows = []
    for i, v in enumerate(over["values"]):
        row = {over["axis"]: v}
        for name in names:
            t = over["ms"][name][i]
            row[name] = f"{t:.3g}" if name == names[0] else f"{t:.3g} ({t / base[i]:.1f}×)"
        rows.append(row)
    return markdown_table(rows)


def geoopt_table(overs: list[dict]) -> str:
    """One row per scaling point (n × p): geoopt RiemannianAdam ÷ RiemannianAdam, ÷ LandingAdam, and
    LandingAdam ÷ its matrix products alone."""
    rows = []
    for over in overs:
        for i, v in enumerate(over["values"]):
            shape = {"count": over["count"], **over["fixed"], **{k: v for k in over["axis"].split("=")}}
            ms = {name: t[i] for name, t in over["ms"].items()}
            geo = ms["geoopt RiemannianAdam"]
            row = {"matrices × (n × p)": f"{shape['count']} × ({shape['n']} × {shape['p']})"}
            for tag in ("", BEFORE) if "LandingAdam" + BEFORE in ms else ("",):
                row["RiemannianAdam" + tag] = f"{geo / ms['RiemannianAdam' + tag]:.2f}"
                row["LandingAdam" + tag] = f"{geo / ms['LandingAdam' + tag]:.2f}"
                row["LandingAdam ÷ floor" + tag] = f"{ms['LandingAdam' + tag] / ms[FLOOR + tag]:.2f}"
            rows.append(row)
    return markdown_table(rows)


def _plot(results: dict, path: Path, header: str) -> None:
    mixes = list(results)
    names = list(next(iter(results.values())))
    plot_bars(path, mixes, {name: [results[m][name]["ms"] for m in mixes] for name in names}, header,
              "ms per step (log)")
