"""Build ``wordnet_glosses.jsonl.gz``: WordNet 3.0 noun glosses labeled by their lexicographer file.

Run once (the output is committed):  ``python -m benchmarks.data.build_wordnet [--wordnet-dir DIR]``
DIR holds WordNet's ``data.noun`` (Debian/Ubuntu: ``apt-get install wordnet-base`` puts it in
/usr/share/wordnet). WordNet is distributed under the WordNet 3.0 licence, reproduced in
``LICENSE-WordNet`` next to the data file; its notice must travel with every copy.

The task: given the definition of a noun synset (the gloss up to its first example sentence,
without the synset's own words), predict its lexicographer file (noun.artifact, noun.person, ...).
The ``CLASSES`` are the ten noun files with the most synsets; definitions shared by several
synsets are dropped (so no text is in both splits); ``PER_CLASS`` synsets are drawn from each (seeded), ``TEST_PER_CLASS`` of them form the test split. Each line is
``{"id": "<synset offset>", "text": ..., "label": "<lexicographer file>", "split": "train"|"test"}``.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "wordnet_glosses.jsonl.gz"
SEED = 20240607
PER_CLASS = 1200
TEST_PER_CLASS = 200
# lexicographer file number -> name (WordNet's lexnames), the ten largest noun files
CLASSES = {
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    10: "noun.communication",
    15: "noun.location",
    18: "noun.person",
    20: "noun.plant",
    26: "noun.state",
    27: "noun.substance",
}


def definition(gloss: str) -> str:
    """The definition part of a gloss: the text before the first quoted example, without trailing ';'."""
    text = gloss.split('"', 1)[0].strip()
    return text.rstrip(";").strip()


def read_noun_glosses(wordnet_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """{label: [(synset offset, definition), ...]} for the synsets of ``CLASSES`` in data.noun."""
    path = Path(wordnet_dir) / "data.noun"
    if not path.is_file():
        raise FileNotFoundError(
            f"build_wordnet: {path} not found; install WordNet 3.0 (e.g. apt-get install wordnet-base) "
            "and pass --wordnet-dir pointing at the directory holding data.noun"
        )
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in CLASSES.values()}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition("|")
            fields = head.split()
            label = CLASSES.get(int(fields[1]))
            text = definition(gloss)
            if label is not None and len(text) >= 10:
                out[label].append((fields[0], text))
    return out


def build(wordnet_dir: Path, output: Path = OUTPUT) -> dict[str, int]:
    """Sample, split and write the data set (byte-for-byte reproducible); returns counts per split."""
    rng = random.Random(SEED)
    rows = []
    glosses = read_noun_glosses(wordnet_dir)
    seen: dict[str, int] = {}
    for synsets in glosses.values():
        for _, text in synsets:
            seen[text] = seen.get(text, 0) + 1
    for label in sorted(CLASSES.values()):
        synsets = [(o, t) for o, t in glosses[label] if seen[t] == 1]  # a repeated text could cross splits
        picked = rng.sample(sorted(synsets), PER_CLASS)
        for i, (offset, text) in enumerate(picked):
            rows.append({"id": offset, "text": text, "label": label, "split": "test" if i < TEST_PER_CLASS else "train"})
    rng.shuffle(rows)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    output.write_bytes(buf.getvalue())
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["split"]] = counts.get(row["split"], 0) + 1
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    counts = build(args.wordnet_dir, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e3:.0f} kB): {counts}")


if __name__ == "__main__":
    main()
