"""Data shipped with the benchmarks (see build_wordnet.py for how it was made and LICENSE-WordNet)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

WORDNET = Path(__file__).resolve().parent / "wordnet_glosses.jsonl.gz"


def load_wordnet(path: Path = WORDNET) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(classes, {"train": [(text, label index)], "test": [...]}) from the shipped WordNet glosses."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for r in rows:
        splits[r["split"]].append((r["text"], index[r["label"]]))
    return classes, splits
