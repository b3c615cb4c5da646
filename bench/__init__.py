"""CLoRA benchmark: ``.venv/bin/python -m bench`` (see bench/README.md and docs/benchmarks.md).

Python API::

    from bench import BenchOptions, quick_options, run_benchmark, format_table
    results = run_benchmark(quick_options(steps=4, loras=(2,)))
    print(format_table(results))
"""

from .run import BenchOptions, format_table, paper_options, prompt_for, quick_options, run_benchmark

__all__ = ["BenchOptions", "format_table", "paper_options", "prompt_for", "quick_options", "run_benchmark"]
