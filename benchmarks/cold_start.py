"""Cold start: a fresh `mmretrieve search` process, and the torch runtime's first text vector (issue 17, item 6).

Each round runs, in turn, as fresh processes timed from start to exit:
  - `mmretrieve search QUERY --index-dir INDEX --model EXPORT` (the ONNX runtime), this tree, run
    as a user runs it: the ``mmretrieve`` command beside this Python (``python -m mmretrieve``
    where there is none);
  - the same with every module compiled from source at start (no bytecode cache);
  - the same with ``--before SRC`` (a folder holding an older ``mmretrieve`` package, e.g.
    ``git archive COMMIT mmretrieve | tar -x -C SRC``) first on PYTHONPATH;
  - benchmarks/baseline_script.py's ``search`` mode on the same vectors (the hand-written script);
  - the torch runtime embedding one text query with ``--model`` (default `default`): building
    the embedder and the first vector, with only the text tower built (this tree), and with the
    whole bundle loaded first (``load_bundle``: what the runtime did before).
It also sums `python -X importtime` over one `search` process per tree (modules imported, ms).
One untimed run of each warms the file cache (and the entry-point cache), as for a user's
second command. Python's bytecode cache is on for every process, in a scratch folder
(PYTHONPYCACHEPREFIX), as for an installed package (pip compiles it): with PYTHONDONTWRITEBYTECODE
set, as in some sandboxes, an editable checkout recompiles its ~50 modules at each start (tens of
ms); the row "no bytecode cache" shows that cost. Prints every run, medians, ratios and the load average.

    python benchmarks/cold_start.py --export EXPORT --index-dir INDEX [--before SRC] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUERY = "two children playing in the snow"
NO_BYTECODE = "`search`, this tree, no bytecode cache"
TORCH_TEXT = ("from mmretrieve.runtime.torch_runtime import TorchEmbedder\n"
              "TorchEmbedder({model!r}, device='cpu').embed_texts([{query!r}])")
# What the torch runtime did before it built towers lazily: the whole bundle, then one text.
TORCH_TEXT_BOTH = ("import torch\nfrom mmretrieve.bundle import load_bundle\n"
                   "model = load_bundle({model!r}).eval()\n"
                   "feeds = model.text_encoder.preprocessor([{query!r}])\n"
                   "with torch.inference_mode():\n"
                   "    model.encode_text({{k: torch.from_numpy(v) for k, v in feeds.items()}})")


def run(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=env["BENCH_CWD"])
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def import_time(command: list[str], env: dict[str, str]) -> tuple[int, float]:
    """(modules imported, total ms of import time) of one process, from -X importtime."""
    done = subprocess.run(command, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True,
                          cwd=env["BENCH_CWD"])
    rows = [line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:")][1:]
    top_level = [int(cumulative) for _, cumulative, name in rows if not name.startswith("  ")]
    return len(rows), sum(top_level) / 1000


def with_bytecode(env: dict[str, str], cache: Path) -> dict[str, str]:
    """``env`` with Python's bytecode cache on, kept in ``cache`` (not in the checkout)."""
    env = {key: value for key, value in env.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(cache)}


def without_bytecode(env: dict[str, str]) -> dict[str, str]:
    """``env`` compiling every module from source at start (PYTHONDONTWRITEBYTECODE, no cache folder)."""
    env = {key: value for key, value in env.items() if key != "PYTHONPYCACHEPREFIX"}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1"}


def mmretrieve_command() -> list[str]:
    """The ``mmretrieve`` command a user types: the console script beside this Python, else ``-m``."""
    script = Path(sys.executable).parent / "mmretrieve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mmretrieve"]


def make_script_index(index_dir: Path, out: Path) -> None:
    """The script's index.faiss and paths.txt from the vectors mmretrieve stored (the same rows)."""
    import faiss
    import numpy as np

    from mmretrieve.index.search import IndexReader

    store = IndexReader(index_dir).store  # the model is loaded only when a query is embedded: never here
    ids, vectors = store.all_embeddings()
    items = store.items_by_id(ids)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    faiss.write_index(index, str(out / "index.faiss"))
    (out / "paths.txt").write_text("".join(f"{items[int(i)].path}\n" for i in ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="an `mmretrieve export` folder")
    parser.add_argument("--index-dir", type=Path, required=True, help="an index built with --model EXPORT")
    parser.add_argument("--before", type=Path, help="a folder holding an older mmretrieve package to compare")
    parser.add_argument("--model", default="default", help="bundle for the torch runtime's text query")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
    args.export, args.index_dir = args.export.resolve(), args.index_dir.resolve()
    load_before = os.getloadavg()
    python = sys.executable
    trees = {"this tree": os.environ.get("PYTHONPATH", "")}
    if args.before:
        trees["before"] = str(args.before.resolve())
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    # Run from a scratch folder: `python -m`/-c put the working folder first on sys.path, which
    # would shadow --before's PYTHONPATH when started in a checkout.
    os.environ["BENCH_CWD"] = str(work)
    try:
        make_script_index(args.index_dir, work)
        cache = work / "pycache"
        environ = with_bytecode(dict(os.environ), cache)
        search = [*mmretrieve_command(), "search", QUERY, "--index-dir", str(args.index_dir), "--model",
                  str(args.export)]
        commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        for tree, path in trees.items():
            commands[f"`search`, {tree}"] = (search, {**environ, "PYTHONPATH": path})
            if tree == "this tree":
                commands[NO_BYTECODE] = (search, without_bytecode({**environ, "PYTHONPATH": path}))
        commands["`search`, hand-written script"] = ([python, str(HERE / "baseline_script.py"), "search", "--export",
                                                     str(args.export), "--out", str(work), "--query", QUERY],
                                                    environ)
        commands["torch, one text query: text tower only (this tree)"] = (
            [python, "-c", TORCH_TEXT.format(model=args.model, query=QUERY)], environ)
        commands["torch, one text query: both towers built (as before)"] = (
            [python, "-c", TORCH_TEXT_BOTH.format(model=args.model, query=QUERY)], environ)
        for command, env in commands.values():
            run(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        print("| round | what | s |\n|---:|---|---:|")
        for round_ in range(1, args.rounds + 1):
            for name, (command, env) in commands.items():
                times[name].append(run(command, env))
                print(f"| {round_} | {name} | {times[name][-1]:.3f} |", flush=True)
        imports = {tree: import_time(commands[f"`search`, {tree}"][0], commands[f"`search`, {tree}"][1])
                   for tree in trees}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = statistics.median
    both = median(times["torch, one text query: both towers built (as before)"])
    script = median(times["`search`, hand-written script"])
    print(f"\n| what (median of {args.rounds}, interleaved) | s | vs script | vs before |\n|---|---:|---:|---:|")
    for name, values in times.items():
        before_name = name.replace("this tree", "before")
        versus_before = (f"{median(values) / median(times[before_name]):.2f}x"
                         if args.before and "this tree" in name and before_name in times else "")
        versus_script = f"{median(values) / script:.2f}x" if name.startswith("`search`") else ""
        if name.startswith("torch"):
            versus_before = f"{median(values) / both:.2f}x"
        print(f"| {name} | {median(values):.3f} | {versus_script} | {versus_before} |")
    print("\n| `search` process, -X importtime | modules | import ms (top-level cumulative) |\n|---|---:|---:|")
    for tree, (count, ms) in imports.items():
        print(f"| {tree} | {count} | {ms:.0f} |")
    load_after = os.getloadavg()
    runner = "the `mmretrieve` command" if len(mmretrieve_command()) == 1 else "`python -m mmretrieve`"
    print(f"\n`search` runs {runner}; bytecode cached in a scratch "
          f"PYTHONPYCACHEPREFIX except for \"no bytecode cache\" (PYTHONDONTWRITEBYTECODE in this shell: "
          f"{os.environ.get('PYTHONDONTWRITEBYTECODE') or 'unset'})")
    print(f"\nload average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
