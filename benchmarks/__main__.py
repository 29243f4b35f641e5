"""Entry point: ``python -m benchmarks <name> [--quick] [--out results] [the benchmark's own options]``."""
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
    first = argparse.ArgumentParser(add_help=False)  # the name alone, to add that benchmark's options
    first.add_argument("name", nargs="?", choices=available())
    name = first.parse_known_args(argv)[0].name
    module = importlib.import_module(f"benchmarks.{name}") if name else None
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = vars(parser.parse_args(argv))
    args.pop("name")
    args["out"] = args["out"] / name
    module.run(**args)


if __name__ == "__main__":
    main()
