"""Warm search, one engine per process: the hand-written script's loop against ``Index.search``.

``baseline_script.py search-bench`` interleaves both sides in one process, where each side's
onnxruntime threads can still be spinning while the other side runs; this script gives each side
a process of its own (alternating script / mmretrieve processes, ``--rounds`` times), so each is
timed as a user's program would run it. Each process warms up on the queries, then times
``--repeats`` passes over them in 5 blocks and prints the median ms per query; the summary prints
the median over processes of each side and the ratio. ``--env NAME=VALUE`` adds a third side,
mmretrieve under that environment (e.g. ``MMRETRIEVE_ORT_SPINNING=0``).

    python benchmarks/warm_search_processes.py --export EXPORT --index-dir INDEX [--rounds 3] [--env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args) -> None:
    """Time one side in this process and print its median ms per query as JSON."""
    sys.path.insert(0, str(HERE))
    from baseline_script import QUERIES, load_export, script_index_from, search

    from mmretrieve.api import Index

    library = Index(args.index_dir, model=str(args.export))
    if args.side == "script":
        index, paths = script_index_from(library)
        export = load_export(Path(args.export))
        session = export["session"]("text")
        run = lambda q: search(q, index, paths, export, session)  # noqa: E731
    else:
        run = lambda q: library.search(q, k=10)  # noqa: E731
    for query in QUERIES:
        run(query)
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(args.repeats):
            for query in QUERIES:
                run(query)
        blocks.append((time.perf_counter() - start) / (args.repeats * len(QUERIES)) * 1000)
    print(json.dumps({"ms": statistics.median(blocks)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--index-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="passes over the 10 queries per timed block")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE: a third side, mmretrieve with it set")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)
    sides = {"script": {}, "mmretrieve": {}}
    if args.env:
        sides["mmretrieve, " + " ".join(args.env)] = dict(item.split("=", 1) for item in args.env)
    load_before = os.getloadavg()
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, extra in sides.items():
            command = [sys.executable, __file__, "--export", args.export, "--index-dir", args.index_dir,
                       "--repeats", str(args.repeats), "--side", "script" if name == "script" else "mmretrieve"]
            out = subprocess.run(command, env={**os.environ, **extra}, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
    script = statistics.median(results["script"])
    print(f"| warm text search, one side per process (median of {args.rounds}) | ms/query | vs script | per process |")
    print("|---|---:|---:|---|")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / script:.2f}x | {' '.join(f'{v:.2f}' for v in values)} |")
    print(f"\nload average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
