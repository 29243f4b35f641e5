"""Entry point: ``python -m benchmarks <name> [--quick] [--out results]``."""
import argparse
import importlib
import pkgutil
from pathlib import Path

import benchmarks


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_") and not m.ispkg)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=available())
    parser.add_argument("--quick", action="store_true", help="a short run with smaller grids")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    module = importlib.import_module(f"benchmarks.{args.name}")
    module.run(quick=args.quick, out=args.out / args.name)


if __name__ == "__main__":
    main()
