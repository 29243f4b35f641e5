"""Shared reporting helpers for the benchmarks: JSON, Markdown tables, PNG plots, device header, progress.

Every benchmark writes ``<out>/<name>.json``, ``<out>/<name>.md`` and PNG plots next to them.
The device header says what measured the numbers; it names a GPU only when a CUDA device was
actually used.
"""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["device_header", "write_json", "markdown_table", "write_markdown", "plot_lines", "progress"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_header(device: torch.device | str = "cpu") -> str:
    """One line: which device measured the numbers, torch version, thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device_header: device='cuda' but no CUDA device is available")
        what = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        what = f"CPU {_cpu_model()} ({os.cpu_count()} logical cores)"
    return f"Measured on {what}; torch {torch.__version__}; {torch.get_num_threads()} threads; Python {platform.python_version()}"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (tensors become lists, NaN becomes null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table from row dicts; columns default to the keys of the first row."""
    if not rows:
        raise ValueError("markdown_table: rows is empty; pass at least one row dict")
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, sections: Iterable[str], device: str = "cpu") -> Path:
    """Write a Markdown report: ``# title``, the device header, then each section (already Markdown)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"# {title}", "", device_header(device), ""]
    for s in sections:
        body += [s.rstrip("\n"), ""]
    path.write_text("\n".join(body), encoding="utf-8")
    return path


def plot_lines(
    path: Path,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    logx: bool = False,
    hline: float | None = None,
) -> Path:
    """Save a line plot (PNG, Agg backend): ``series`` maps a label to (x, y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), label=label, linewidth=1.4)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(path: Path, groups: Sequence[str], bars: dict[str, Sequence[float]], title: str, ylabel: str) -> Path:
    """Save a grouped bar chart on a log scale (PNG, Agg backend): ``bars`` maps a label to one value
    per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        ax.bar([j + i * width for j in range(len(groups))], list(values), width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], list(groups), fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def progress(iterable=None, total: int | None = None, desc: str = "", **kwargs):
    """A tqdm progress bar on stderr (not left on screen when done, unless leave=True)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, total=total, desc=desc, **kwargs)
