"""The hand-written script a user would write instead of mmretrieve, and a benchmark against it.

The script (``load_export`` .. ``search``, about 40 lines) uses only Pillow, NumPy, tokenizers,
onnxruntime and faiss on an ONNX export of mmretrieve (`mmretrieve export --model default --out
DIR`): it decodes each image with Pillow, applies the export's image_preprocess.json with the same
resize / centre-crop / normalise arithmetic as mmretrieve.preprocess.ImagePreprocessor, runs
batches of 32 through image.onnx, L2-normalises and fills a faiss.IndexFlatIP; a text query goes
through text/tokenizer.json and text.onnx and is searched. Every later change to mmretrieve is
measured against it (issue 17).

    python benchmarks/baseline_script.py --export EXPORT_DIR [--images DIR] [--count 1000] [--rounds 3]
    python benchmarks/baseline_script.py index --export EXPORT_DIR --images DIR --out OUT_DIR
    python benchmarks/baseline_script.py search --export EXPORT_DIR --out OUT_DIR --query "a dog on a beach"
    python benchmarks/baseline_script.py search-bench --export EXPORT_DIR --index-dir INDEX_DIR [--quick]

Benchmark (the default mode): the first ``--count`` images (sorted by name) are linked into a
scratch folder; each round runs, in turn, (A) this script's ``index`` mode and (B) `mmretrieve
index` (``--model`` the export, a fresh ``--index-dir``, ``--index-type flat``), both as
subprocesses timed on the wall clock from start to exit; then warm text search, in-process:
(A) this script's tokenizer + ONNX + faiss loop over the script's index and (B)
``mmretrieve.api.Index.search`` over mmretrieve's index, median per query. It prints one row per
run, a table of medians and ratios, the load average before and after, and whether the script's
vectors equal the ones mmretrieve stored for the same images (to 1e-5; read after timing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps
from tokenizers import Tokenizer

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
QUERIES = ["a dog running on the beach", "two children playing in the snow", "a man riding a bicycle",
           "a brown dog jumps over a log", "people walking down a busy city street", "a girl in a pink dress",
           "a surfer rides a large wave", "a black and white dog playing with a ball in the grass",
           "a climber on a rock face", "a group of people sitting at a table"]


# ---- the hand-written script -------------------------------------------------------------------------
def load_export(folder: Path) -> dict:
    manifest = json.loads((folder / "export.json").read_text())
    pre = json.loads((folder / "image" / "image_preprocess.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "text" / "tokenizer.json"))
    tokenizer.enable_truncation(json.loads((folder / "text" / "text_preprocess.json").read_text())["max_length"])
    session = lambda tower: ort.InferenceSession(str(folder / manifest["towers"][tower]["file"]))  # noqa: E731
    return {"manifest": manifest, "pre": pre, "tokenizer": tokenizer, "session": session,
            "mean": np.asarray(pre["mean"], np.float32).reshape(3, 1, 1),
            "std": np.asarray(pre["std"], np.float32).reshape(3, 1, 1),
            "uint8": manifest["towers"]["image"].get("input_dtype") == "uint8"}  # the graph normalises bytes


def preprocess(path: Path, ex: dict) -> np.ndarray:
    pre, image = ex["pre"], ImageOps.exif_transpose(Image.open(path), in_place=False).convert("RGB")
    size, (w, h) = pre["size"], image.size
    scale = int(size / pre["crop_pct"])  # floor: torchvision Resize + CenterCrop, as timm does
    nw, nh = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    resample = getattr(Image.Resampling, pre["interpolation"].upper())
    image = image.resize((nw, nh), resample).crop((left, top, left + size, top + size))
    if ex["uint8"]:
        return np.asarray(image, dtype=np.uint8)
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 - ex["mean"]) / ex["std"]


def build_index(paths: list[Path], ex: dict, batch: int = 32) -> faiss.IndexFlatIP:
    session, graph = ex["session"]("image"), ex["manifest"]["towers"]["image"]
    index = faiss.IndexFlatIP(ex["manifest"]["embed_dim"])
    for start in range(0, len(paths), batch):
        pixels = np.stack([preprocess(p, ex) for p in paths[start:start + batch]])
        vectors = np.ascontiguousarray(session.run([graph["output"]], {graph["inputs"][0]: pixels})[0], np.float32)
        faiss.normalize_L2(vectors)
        index.add(vectors)
    return index


def embed_text(text: str, ex: dict, session) -> np.ndarray:
    encoding, graph = ex["tokenizer"].encode(text), ex["manifest"]["towers"]["text"]
    feeds = {"input_ids": np.asarray([encoding.ids], np.int64),
             "attention_mask": np.asarray([encoding.attention_mask], np.int64)}
    vector = np.ascontiguousarray(session.run([graph["output"]], feeds)[0], np.float32)
    faiss.normalize_L2(vector)
    return vector


def search(text: str, index: faiss.IndexFlatIP, paths: list[str], ex: dict, session, k: int = 10):
    scores, ids = index.search(embed_text(text, ex, session), k)
    return [(paths[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
# ---- end of the hand-written script ------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)


def index_mode(args) -> None:
    ex, paths = load_export(args.export), list_images(args.images)
    index = build_index(paths, ex)
    args.out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(args.out / "index.faiss"))
    (args.out / "paths.txt").write_text("".join(f"{p.name}\n" for p in paths))
    print(f"indexed {index.ntotal} images into {args.out}")


def search_mode(args) -> None:
    ex = load_export(args.export)
    index, paths = faiss.read_index(str(args.out / "index.faiss")), (args.out / "paths.txt").read_text().split()
    for rank, (path, score) in enumerate(search(args.query, index, paths, ex, ex["session"]("text")), 1):
        print(f"{rank:>2}  {score:.4f}  {path}")


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def per_query_ms(run, queries: list[str]) -> float:
    times = []
    for query in queries:
        started = time.perf_counter()
        run(query)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def bench_mode(args) -> None:
    load_before = os.getloadavg()
    images = list_images(args.images)[:args.count]
    if len(images) < args.count:
        sys.exit(f"{args.images} has only {len(images)} images; --count {args.count} asked for")
    export = args.export.resolve()
    work = Path(tempfile.mkdtemp(prefix="baseline-"))
    try:
        run_bench(args, images, export, work, load_before)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_bench(args, images: list[Path], export: Path, work: Path, load_before: tuple) -> None:
    folder = work / "images"
    folder.mkdir()
    for path in images:
        (folder / path.name).symlink_to(path.resolve())
    script = [sys.executable, str(Path(__file__).resolve()), "index", "--export", str(export), "--images", str(folder)]
    library = [sys.executable, "-m", "mmretrieve", "index", str(folder), "--model", str(export), "--index-type", "flat",
               "--follow-links"]
    rows, index_s, script_out, library_dir = [], {"script": [], "mmretrieve": []}, None, None
    for round_ in range(1, args.rounds + 1):
        script_out, library_dir = work / f"script-{round_}", work / f"mmretrieve-{round_}"
        for name, command in (("script", script + ["--out", str(script_out)]),
                              ("mmretrieve", library + ["--index-dir", str(library_dir)])):
            seconds = timed(command)
            index_s[name].append(seconds)
            rows.append((f"index {args.count} images", name, round_, f"{seconds:.2f} s",
                         f"{args.count / seconds:.1f} img/s"))

    # Warm text search, in-process: each side's model loaded and 3 queries run before timing.
    from mmretrieve.api import Index  # the library side only; the script above imports none of it

    ex = load_export(export)
    text_session = ex["session"]("text")
    script_index = faiss.read_index(str(script_out / "index.faiss"))
    script_paths = (script_out / "paths.txt").read_text().split()
    library_index = Index(library_dir, model=str(export))
    sides = {"script": lambda q: search(q, script_index, script_paths, ex, text_session),
             "mmretrieve": lambda q: library_index.search(q, k=10)}
    for run in sides.values():
        for query in QUERIES[:3]:
            run(query)
    search_ms = {"script": [], "mmretrieve": []}
    for round_ in range(1, args.rounds + 1):
        for name, run in sides.items():
            ms = per_query_ms(run, QUERIES)
            search_ms[name].append(ms)
            rows.append(("warm text search", name, round_, f"{ms:.2f} ms/query", ""))
    load_after = os.getloadavg()

    print("| what | side | round | time | rate |\n|---|---|---:|---:|---:|")
    for what, side, round_, time_, rate in rows:
        print(f"| {what} | {side} | {round_} | {time_} | {rate} |")
    script_index_s, library_index_s = statistics.median(index_s["script"]), statistics.median(index_s["mmretrieve"])
    script_ms, library_ms = statistics.median(search_ms["script"]), statistics.median(search_ms["mmretrieve"])
    print(f"\n| what (median of {args.rounds} rounds) | mmretrieve | script | ratio |\n|---|---:|---:|---:|")
    print(f"| `index` {args.count} images, ONNX (img/s, process start to exit) | {args.count / library_index_s:.1f} | "
          f"{args.count / script_index_s:.1f} | {script_index_s / library_index_s:.2f}x the script's rate |")
    print(f"| warm text search on {args.count} (ms/query) | {library_ms:.2f} | {script_ms:.2f} | "
          f"{library_ms / script_ms:.2f}x the script's time |")
    print(f"\nload average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} cores")

    # Vector equality, after all timing: the script's rows against the ones mmretrieve stored.
    script_vectors = script_index.reconstruct_n(0, script_index.ntotal)
    store = library_index.reader.store
    ids, library_vectors = store.all_embeddings()
    names = {id_: Path(item.path).name for id_, item in store.items_by_id(ids).items()}
    by_name = {names[int(id_)]: vector for id_, vector in zip(ids, library_vectors)}
    missing = [name for name in script_paths if name not in by_name]
    diff = max(float(np.abs(by_name[name] - vector).max()) for name, vector in zip(script_paths, script_vectors)
               if name in by_name)
    equal = not missing and len(by_name) == len(script_paths) and diff <= 1e-5
    print(f"vectors: {len(script_paths)} script rows vs {len(by_name)} mmretrieve rows, {len(missing)} missing, "
          f"max abs diff {diff:.3g} -> {'EQUAL' if equal else 'NOT EQUAL'} to 1e-5")
    assert equal, "the script's vectors differ from mmretrieve's"


def script_index_from(library) -> tuple[faiss.IndexFlatIP, list[str]]:
    """The script's faiss index and paths, filled with the vectors an mmretrieve ``Index`` stored
    (the same rows), so nothing is embedded twice."""
    store = library.reader.store
    ids, vectors = store.all_embeddings()
    names = store.items_by_id(ids)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    return index, [names[int(i)].path for i in ids]


def search_bench_mode(args) -> None:
    """Search only, on an index mmretrieve built already (``--index-dir``): the script's faiss index is
    filled with the vectors mmretrieve stored (the same rows), so nothing is embedded twice.

    Warm: per-query medians, in-process, interleaved per round: the script's loop, mmretrieve's
    ``Index.search`` under its thread policy, and ``Index.search`` with the engines at their own
    defaults (onnxruntime threads spinning, faiss on every core: what mmretrieve did before the
    policy). Cold: `mmretrieve search` (the command a user types) and this script's ``search`` mode as
    fresh processes, with Python's bytecode cache on in a scratch folder as for an installed package,
    and `mmretrieve search` once more compiling its modules at each start (no bytecode cache: what
    PYTHONDONTWRITEBYTECODE does to an editable checkout; cold_start.py's docstring)."""
    from cold_start import mmretrieve_command, with_bytecode, without_bytecode

    from mmretrieve import threads
    from mmretrieve.api import Index

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="baseline-search-"))
    try:
        library = Index(args.index_dir, model=str(args.export))
        index, paths = script_index_from(library)
        faiss.write_index(index, str(work / "index.faiss"))
        (work / "paths.txt").write_text("".join(f"{p}\n" for p in paths))

        ex = load_export(args.export)
        text_session = ex["session"]("text")
        policy = threads.current_policy()
        before = threads.ThreadPolicy("search", policy.cores, policy.cores, True, policy.cores, 0)
        unmanaged = {"policy": before}

        def run_unmanaged(query):  # the same Index code, with the engines' own defaults
            chosen, small = threads._CURRENT, threads.FAISS_SMALL_BATCH
            threads._CURRENT, threads.FAISS_SMALL_BATCH = unmanaged["policy"], 0
            try:
                return unmanaged["index"].search(query, k=10)
            finally:
                threads._CURRENT, threads.FAISS_SMALL_BATCH = chosen, small

        threads._CURRENT = before
        unmanaged["index"] = Index(args.index_dir, model=str(args.export))
        unmanaged["index"].search(QUERIES[0])  # its onnxruntime session made under the old settings
        threads._CURRENT = policy
        sides = {"script": lambda q: search(q, index, paths, ex, text_session),
                 "mmretrieve": lambda q: library.search(q, k=10),
                 "mmretrieve, engines' defaults": run_unmanaged}
        for run in sides.values():
            for query in QUERIES[:3]:
                run(query)
        warm: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds * 3):
            for name, run in sides.items():
                warm[name].append(per_query_ms(run, QUERIES))

        cold_rounds = max(args.rounds, 5)  # a process start varies more than a warm query: at least 5
        environ = with_bytecode(dict(os.environ), work / "pycache")
        search_command = [*mmretrieve_command(), "search", QUERIES[1], "--index-dir", str(args.index_dir),
                          "--model", str(args.export)]
        cold_commands = {
            "script": ([sys.executable, str(Path(__file__).resolve()), "search", "--export", str(args.export),
                        "--out", str(work), "--query", QUERIES[1]], environ),
            "mmretrieve": (search_command, environ),
            "mmretrieve, no bytecode cache": (search_command, without_bytecode(environ)),
        }
        for command, env in cold_commands.values():
            timed(command, env)  # file cache, bytecode and entry-point cache warm, as for a user's second search
        cold: dict[str, list[float]] = {name: [] for name in cold_commands}
        for _ in range(cold_rounds):
            for name, (command, env) in cold_commands.items():
                cold[name].append(timed(command, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    median = statistics.median
    print(f"| what ({len(paths)} items; median of {args.rounds * 3} warm / {cold_rounds} cold rounds, interleaved) "
          f"| time | vs script |\n|---|---:|---:|")
    for name, values in warm.items():
        print(f"| warm `search(q)`, {name} | {median(values):.2f} ms | "
              f"{median(values) / median(warm['script']):.2f}x |")
    for name, values in cold.items():
        print(f"| cold `search` process, {name} | {median(values):.3f} s | "
              f"{median(values) / median(cold['script']):.2f}x |")
    print(f"\nwarm rounds (ms): " + "; ".join(f"{name}: {' '.join(f'{v:.2f}' for v in values)}"
                                          for name, values in warm.items()))
    print(f"cold rounds (s): " + "; ".join(f"{name}: {' '.join(f'{v:.3f}' for v in values)}"
                                         for name, values in cold.items()))
    print(f"cold: {'the `mmretrieve` command' if len(mmretrieve_command()) == 1 else '`python -m mmretrieve`'}; "
          f"PYTHONDONTWRITEBYTECODE in this shell: {os.environ.get('PYTHONDONTWRITEBYTECODE') or 'unset'}")
    print(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "index", "search", "search-bench"))
    parser.add_argument("--export", type=Path, required=True, help="an `mmretrieve export` folder")
    parser.add_argument("--images", type=Path, default=Path("../shared/data/flickr8k-train/images"))
    parser.add_argument("--count", type=int, default=1000, help="images to index (bench)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (bench)")
    parser.add_argument("--out", type=Path, help="where index mode writes index.faiss and paths.txt")
    parser.add_argument("--query", default=QUERIES[0], help="text to search for (search mode)")
    parser.add_argument("--index-dir", type=Path, help="an index mmretrieve built with --export (search-bench)")
    parser.add_argument("--quick", action="store_true", help="2 rounds (bench: 300 images)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
        args.count = min(args.count, 300)
    if args.mode in ("index", "search") and args.out is None:
        parser.error(f"{args.mode} needs --out")
    if args.mode == "search-bench" and args.index_dir is None:
        parser.error("search-bench needs --index-dir")
    {"bench": bench_mode, "index": index_mode, "search": search_mode, "search-bench": search_bench_mode}[args.mode](args)


if __name__ == "__main__":
    main()
