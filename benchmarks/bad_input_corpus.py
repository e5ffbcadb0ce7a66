"""The bad-input corpus through every entry point that reads images, as a table.

Writes the corpus of tests/bad_inputs.py (zero-byte, truncated, non-image, decompression bomb,
1x16000 and 40000x1 strips, a 256 MB+ file, a link to /dev/zero, a FIFO, CMYK, 16-bit and
float images, transparency, EXIF rotation, an animated GIF, unicode and newline names, link
loops, ...) into OUT/corpus and runs it against:

- index:          `mmretrieve index OUT/corpus --json` in a subprocess, run twice; the second
                  run must list the same failures ("failed before") and add nothing;
- search --image: the reader `search --image` uses (IndexReader.search_image), one query per
                  file: the file itself must come back first (score 1) or be refused in one line;
- data loading:   mmretrieve.data.load_captions on a JSONL naming every file (what `train` and
                  `eval` read), images decoded;
- serve upload:   POST /api/search/image with the file's bytes (FastAPI's TestClient);
- peak MB:        peak resident memory (VmHWM) of a fresh process that decodes and
                  preprocesses just that file (decode_one, the indexer's reader), 60 s limit;
                  about 60 MB is the interpreter with NumPy and Pillow.

Each cell is checked against the expected outcome in tests/bad_inputs.py; the last column says
whether the row matched, and the exit status is 1 if any did not. Progress goes to stderr.

    python benchmarks/bad_input_corpus.py OUT                   # the offline `default` model
    python benchmarks/bad_input_corpus.py OUT --model BUNDLE    # any bundle or export
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bad_inputs import Case, expected_index, make_corpus  # noqa: E402

PEAK_CODE = """
import sys
from mmretrieve.decode import decode_one
from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor
decoded = decode_one(sys.argv[1], ImagePreprocessor(ImagePreprocessConfig()))
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(peak) / 1024)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def short(text: str, width: int = 44) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def peak_of_decoding(path: str, timeout: float = 60) -> str:
    """Peak resident MB of a fresh process that decodes and preprocesses one file."""
    try:
        done = subprocess.run([sys.executable, "-c", PEAK_CODE, path], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"hung (> {timeout:.0f} s)"
    if done.returncode != 0:
        return f"crashed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})"
    return f"{float(done.stdout):.0f}"


def index_outcomes(root: Path, index_dir: Path, model: str) -> tuple[dict, dict, float, str]:
    """The reports of `index` run twice, the seconds both took, and what went wrong."""
    command = [sys.executable, "-m", "mmretrieve", "index", str(root), "--index-dir", str(index_dir), "--model",
               model, "--json", "--workers", "1"]
    runs, seconds, problems = [], 0.0, []
    for attempt in (1, 2):
        log(f"index run {attempt} ...")
        started = time.perf_counter()
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            problems.append(f"index run {attempt} hung (> 600 s)")
            runs.append({})
            continue
        seconds += time.perf_counter() - started
        if done.returncode != 0:
            problems.append(f"index run {attempt} exited with {done.returncode}: {short(done.stderr, 200)}")
            runs.append({})
            continue
        runs.append(json.loads(done.stdout))
    first, second = runs
    if first and second:
        if second.get("added") or second.get("updated") or second.get("removed"):
            problems.append("the re-run changed the index")
        if {f["path"]: f["reason"] for f in first["failed"]} != {f["path"]: f["reason"] for f in second["failed"]}:
            problems.append("the re-run failed other files than the first run")
    return first, second, seconds, "; ".join(problems)


def index_cell(case: Case, path: str, report: dict, indexed: set[str]) -> tuple[str, bool]:
    failed = {f["path"]: f["reason"] for f in report.get("failed", [])}
    skipped = {f["path"]: f["reason"] for f in report.get("skipped", [])}
    if path in indexed:
        outcome = "indexed"
    elif path in failed:
        outcome = f"failed: {failed[path]}"
    elif path in skipped:
        outcome = f"skipped: {skipped[path]}"
    else:
        outcome = "absent"
    expected = expected_index(case)
    if expected.startswith("listed"):
        ok = outcome.startswith(("failed", "skipped")) and case.index_words in outcome.lower()
    else:
        ok = outcome == expected
    return outcome, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the corpus and its index (corpus/ and index/ are replaced)")
    parser.add_argument("--model", default="default", help="model bundle, export or registered name")
    args = parser.parse_args()

    root, index_dir = args.out / "corpus", args.out / "index"
    for folder in (root, index_dir):
        if folder.exists():
            shutil.rmtree(folder)
    cases = make_corpus(root)
    log(f"{len(cases)} cases written to {root}")

    report, again, index_seconds, index_problems = index_outcomes(root, index_dir, args.model)
    resolved = str(root.resolve())

    from mmretrieve.data import load_captions
    from mmretrieve.errors import InputError
    from mmretrieve.index.search import IndexReader
    from mmretrieve.index.store import IndexStore
    from mmretrieve.runtime import load_embedder

    with IndexStore.open(index_dir, readonly=True) as store:
        indexed = set(store.known_files())

    log("search --image ...")
    embedder = load_embedder(args.model)
    reader = IndexReader(index_dir, embedder=embedder)
    searched = {}
    for case in cases:
        path = case.path(root)
        try:
            top = reader.search_image([path], k=1)[0][0]
            ok = case.usable and top.score > 0.999
            searched[case.name] = (f"top hit {os.path.basename(top.path)!r} {top.score:.3f}", ok)
        except InputError as exc:
            ok = not case.usable and case.reason in str(exc).lower() and "\n" not in str(exc)
            searched[case.name] = (f"refused: {str(exc).split(': ', 1)[-1]}", ok)
    reader.close()

    log("data loading ...")
    records = [{"image": str(case.path(root)), "captions": [case.kind]} for case in cases]
    (args.out / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    loaded = load_captions(args.out / "captions.jsonl", workers=2)
    kept = {str(item.image) for item in loaded.items}
    reasons = dict(loaded.skipped)

    log("serve upload ...")
    uploads = {}
    try:
        from fastapi.testclient import TestClient

        from mmretrieve.serve import ServeConfig, create_app

        config = ServeConfig(index_dir=index_dir, thumb_cache=args.out / "thumbs", reload_interval=0,
                             model=args.model)
        with TestClient(create_app(config)) as client:
            for case in cases:
                if case.upload is None:
                    uploads[case.name] = ("n/a (no bytes to send)", True)
                    continue
                data = case.path(root).read_bytes()
                response = client.post("/api/search/image", params={"k": 1}, files={"image": ("q", data, "image/png")})
                body = response.json()
                detail = body.get("error") or f"top {body['results'][0]['score']:.3f}"
                uploads[case.name] = (f"{response.status_code} {detail}", response.status_code == case.upload)
    except ImportError:
        uploads = {case.name: ("n/a (fastapi not installed)", True) for case in cases}

    log("peak memory per file ...")
    rows, all_ok = [], not index_problems
    for case in cases:
        path = os.path.join(resolved, case.name)
        index_text, index_ok = index_cell(case, path, report, indexed)
        search_text, search_ok = searched[case.name]
        name = str(case.path(root))
        if case.usable:
            data_text, data_ok = "kept", name in kept
        else:
            data_text = f"skipped: {reasons.get(name, '(kept!)')}"
            data_ok = case.reason in reasons.get(name, "").lower()
        upload_text, upload_ok = uploads[case.name]
        peak_text = peak_of_decoding(path)
        ok = index_ok and search_ok and data_ok and upload_ok and peak_text.isdigit()
        all_ok &= ok
        rows.append([case.kind, short(index_text), short(search_text), short(data_text), short(upload_text, 36),
                     peak_text, "yes" if ok else "NO"])

    header = ["kind", "index outcome", "search --image", "data loading", "serve upload", "peak MB", "as expected"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "/").replace("\n", "\\n") for cell in row) + " |")
    print()
    total = report.get("total", "?")
    print(f"index: {total} items, {len(report.get('failed', []))} failed, {len(report.get('skipped', []))} skipped; "
          f"re-run: {len(again.get('failed', []))} failed before, added {again.get('added', '?')}; "
          f"both runs {index_seconds:.0f} s{'; ' + index_problems if index_problems else ''}")
    print(f"{sum(r[-1] == 'yes' for r in rows)} of {len(rows)} cases as expected")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
