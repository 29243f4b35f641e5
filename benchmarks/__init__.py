"""Benchmarks for stiefel_opt: ``python -m benchmarks <name> [--quick]``.

Each benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool, out: Path) -> dict``
that writes its JSON, Markdown table and PNG plots under ``out`` (``results/<name>/``).
"""
