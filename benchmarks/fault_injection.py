"""Fault injection: SIGKILL `index`, `index --rebuild`, `train` and `export` part-way, check what a
reader sees, finish the run and compare it with an uninterrupted one.

Every command runs as a subprocess of the CLI (``python -m mmretrieve``), so the script depends on
no internals. Per scenario an uninterrupted reference run is made first (timed, and traced with
strace to count the renames and fsyncs it makes in its output folder). Then each trial
copies the starting state, starts the command and kills its process group with SIGKILL:

    random   after a delay drawn uniformly over the span in which the reference run changed its
             output folder (polled every 20 ms), counted from the trial's own first change;
    window   under ``strace -e inject=rename,renameat2,fsync,...:delay_exit=...``, which holds each
             such syscall for a while after it has taken effect; the k-th one that touches the output
             (k drawn over the reference's count) is the kill point, so the kill lands between a
             rename and the next step (needs strace and ptrace rights).

After each kill the published state is checked: ``info --json`` and ``info --verify`` work (or say
in one line that nothing exists yet, where nothing existed before), a search returns as many
items as info reports, with the scores either the old or the new state gives every path (a
rebuild: exactly the old state or exactly the new one), a checkpoint that was written is
loadable, an export folder is the old or the new complete one. Then the same command is run to
completion (``train`` with ``--resume`` once a checkpoint exists) and compared with the
reference: index items, counts and search scores (1e-5), training summary, metrics.jsonl,
checkpoint and best-bundle weights (1e-5), export manifest (hashes, parity).

    python benchmarks/fault_injection.py [--trials 3] [--seed 0] [--kinds random,window]
        [--scenarios index,update,rebuild,train,export] [--images 100] [--work DIR] [--json FILE]

Scenarios: index (a fresh index, generations published on the way: after 24, 48 and 96 images),
update (an index of a folder that since gained, lost and changed files), rebuild (``--rebuild``
with another model over an existing index), train (a run killed, then ``--resume``d; every other
trial kills the resumed run too), export (an export folder replaced by an export of another model).
The table goes to stdout; progress and every failure's reason to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("index", "update", "rebuild", "train", "export")
KINDS = ("random", "window")
WINDOW_SYSCALLS = "rename,renameat,renameat2,fsync,fdatasync"  # the steps that publish (kill points)
WINDOW_DELAY_US = 150_000
QUERIES = ("a red dog", "a blue car", "a green ball on the grass")
TOLERANCE = 1e-5
VARYING_KEYS = {"seconds", "pairs_per_s", "data_wait", "created", "updated", "items_per_s",
               "output", "best_bundle"}  # timings, and the run folder's own path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- running the CLI ---------------------------------------------------------------------------

def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmretrieve", *map(str, args)]


def run_quiet(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def must_run(command: list[str]) -> subprocess.CompletedProcess:
    result = run_quiet(command)
    if result.returncode:
        raise SystemExit(f"set-up command failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return result


def snapshot(paths: list[Path]) -> tuple:
    """Names, sizes and mtimes of everything under ``paths`` (and their hidden siblings)."""
    entries = []
    for root in paths:
        candidates = [root] + ([p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}")]
                               if root.parent.is_dir() else [])
        for top in candidates:
            for folder, _, files in os.walk(top):
                for name in files:
                    with_path = os.path.join(folder, name)
                    try:
                        st = os.lstat(with_path)
                    except OSError:
                        continue
                    entries.append((with_path, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def strace_command(command: list[str], log_file: Path, inject: bool) -> list[str]:
    traced = ["strace", "--seccomp-bpf", "-f", "-qq", "-y", "-e", f"trace={WINDOW_SYSCALLS}", "-o", str(log_file)]
    if inject:
        traced += ["-e", f"inject={WINDOW_SYSCALLS}:delay_exit={WINDOW_DELAY_US}"]
    return traced + command


def strace_works() -> bool:
    if not shutil.which("strace"):
        return False
    probe = subprocess.run(["strace", "--seccomp-bpf", "-f", "-qq", "-e", "trace=rename", "-o", os.devnull, "true"],
                           capture_output=True)
    return probe.returncode == 0


def touches(line: str, targets: list[Path]) -> bool:
    return any(str(t) in line or str(t.parent / f".{t.name}") in line for t in targets)


@dataclass
class Run:
    rc: int | None
    seconds: float
    landed: bool = False  # SIGKILL reached a live process
    first_change: float | None = None  # seconds after start the output folder first changed
    last_change: float | None = None
    events: int = 0  # traced syscalls touching the output
    kill_point: str = ""  # what the kill interrupted (window kills: the delayed syscall)
    stderr: str = ""


def launch(command: list[str], targets: list[Path], workdir: Path, kill_after: float | None = None,
           kill_at_event: int | None = None, trace: bool = False, timeout: float = 900) -> Run:
    """Run ``command``; kill its process group ``kill_after`` seconds after it first changed
    ``targets`` (so that start-up time, which varies with the machine's load, does not move the
    kill), or at the ``kill_at_event``-th traced syscall touching ``targets`` (run under strace
    with delays)."""
    workdir.mkdir(parents=True, exist_ok=True)
    trace_log = workdir / f"strace-{time.monotonic_ns()}.log"
    if kill_at_event is not None or trace:
        command = strace_command(command, trace_log, inject=kill_at_event is not None)
    err_path = workdir / f"stderr-{time.monotonic_ns()}.txt"
    with open(err_path, "w") as err:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        run = Run(None, 0.0)
        before = snapshot(targets)
        seen, buffer, offset = 0, "", 0
        next_poll = 0.0
        while proc.poll() is None:
            now = time.monotonic() - started
            if now > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                run.kill_point = f"hung: killed after {timeout:.0f} s"
                break
            if now >= next_poll:  # the span in which the output changes
                current = snapshot(targets)
                if current != before:
                    run.first_change = run.first_change if run.first_change is not None else now
                    run.last_change = now
                    before = current
                next_poll = now + 0.02
            if kill_after is not None and run.first_change is not None and now >= run.first_change + kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                run.landed, run.kill_point = True, f"{now - run.first_change:.2f} s after its first write"
                break
            if kill_at_event is not None and trace_log.exists():
                with open(trace_log, errors="replace") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                    offset = handle.tell()
                buffer += chunk
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    if touches(line, targets):
                        seen += 1
                        if seen == kill_at_event:
                            os.killpg(proc.pid, signal.SIGKILL)
                            run.landed = True
                            run.kill_point = line.split(None, 1)[-1].replace(f"{workdir}/", "")[:120]
                            break
                if run.landed:
                    break
            time.sleep(0.002 if kill_at_event is not None else 0.01)
        proc.wait()
        run.rc, run.seconds = proc.returncode, time.monotonic() - started
        with contextlib.suppress(OSError):  # the rest of the group (decoding workers) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
    if trace and trace_log.exists():
        run.events = sum(1 for line in trace_log.read_text(errors="replace").splitlines() if touches(line, targets))
    run.stderr = err_path.read_text(errors="replace")
    if run.landed and proc.returncode != -signal.SIGKILL:
        run.landed = False  # it had exited by itself
    trace_log.unlink(missing_ok=True)
    return run


# -- reading state through the public API, in one long-lived process ------------------------------

PROBE = r'''
import json, sys
answers, sys.stdout = sys.stdout, sys.stderr  # whatever the library prints stays off the answers
def search(request):
    import mmretrieve.api as mm
    index = mm.open_index(request["index"])
    try:
        hits = {}
        queries = request["queries"]
        for n, query in enumerate(queries):
            for hit in index.search(query, k=request["k"]):
                hits.setdefault(hit.path, [None] * len(queries))[n] = hit.score
        return {"hits": hits}
    finally:
        index.reader.close()
def tensors(path, kind):
    if kind == "safetensors":
        from safetensors.numpy import load_file
        return load_file(path)
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state["model"].items()}
def handle(request):
    if request["op"] == "search":
        return search(request)
    if request["op"] == "checkpoint":
        import torch
        state = torch.load(request["path"], map_location="cpu", weights_only=True)
        return {"step": json.loads(state["trainer"])["step"]}
    if request["op"] == "diff":
        import numpy as np
        a, b = tensors(request["a"], request["kind"]), tensors(request["b"], request["kind"])
        if a.keys() != b.keys():
            return {"keys": sorted(set(a) ^ set(b))[:5]}
        diffs = [float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if a[k].size]
        return {"max_abs": max(diffs, default=0.0)}
for line in sys.stdin:
    try:
        answer = handle(json.loads(line))
    except Exception as exc:  # an mmretrieve error is one sentence; anything else would be a traceback
        answer = {"error": f"{type(exc).__name__}: {exc}",
                  "traceback": not type(exc).__module__.startswith("mmretrieve")}
    print(json.dumps(answer), file=answers, flush=True)
'''


class Probe:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "TQDM_DISABLE": "1"})

    def ask(self, **request: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def info(path: Path) -> dict[str, Any]:
    """``info --json`` and ``info --verify`` of a folder: rc, JSON, one-line error, traceback seen."""
    shown = run_quiet(cli("info", path, "--json"), timeout=300)
    out: dict[str, Any] = {"rc": shown.returncode, "error": last_line(shown.stderr),
                           "traceback": "Traceback" in shown.stderr}
    if shown.returncode == 0:
        out["json"] = json.loads(shown.stdout)
        verified = run_quiet(cli("info", path, "--verify"), timeout=300)
        out["verify_rc"], out["verify_error"] = verified.returncode, last_line(verified.stderr)
        out["traceback"] |= "Traceback" in verified.stderr
    return out


# -- scenarios ---------------------------------------------------------------------------------

@dataclass
class Trial:
    scenario: str
    kind: str
    kills: int = 0
    landed: int = 0
    problems: list[str] = field(default_factory=list)  # inconsistent states seen after a kill
    differences: list[str] = field(default_factory=list)  # finished run vs uninterrupted
    points: list[str] = field(default_factory=list)


class Scenario:
    name = ""
    resumes = False  # train: finish with --resume once a checkpoint exists

    def __init__(self, fixture: "Fixture"):
        self.fx = fixture
        self.root = fixture.work / self.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.reference: Run | None = None
        self.reference_state: Any = None
        self.old_state: Any = None

    # A scenario gives: output(folder) (what it writes), start(folder) (the state before the run),
    # command(folder, resume), observe(folder) (what a reader sees), consistent(state) -> problems
    # after a kill, compare(folder) -> differences of a finished run from the reference.
    def start(self, folder: Path) -> None:
        pass

    def output(self, folder: Path) -> Path:
        raise NotImplementedError

    def make_reference(self, trace: bool) -> None:
        folder = self.root / "reference"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        self.start(folder)
        self.old_state = self.observe(folder)
        self.reference = launch(self.command(folder), [self.output(folder)], folder, trace=trace)
        if self.reference.rc != 0:
            raise SystemExit(f"{self.name}: the uninterrupted run failed:\n{self.reference.stderr[-2000:]}")
        self.reference_folder = folder
        self.reference_state = self.observe(folder)

    def finish(self, folder: Path, problems: list[str]) -> Run:
        run = launch(self.command(folder, resume=self.can_resume(folder)), [self.output(folder)], folder)
        if run.rc != 0:
            problems.append(f"re-run failed (rc {run.rc}): {last_line(run.stderr)}")
        return run

    def can_resume(self, folder: Path) -> bool:
        return False

    def trial(self, kind: str, rng: random.Random, number: int) -> Trial:
        trial = Trial(self.name, kind)
        folder = self.root / f"{kind}-{number}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        self.start(folder)
        kills = 2 if self.resumes and number % 2 else 1
        for round_ in range(kills):
            if round_ and not self.can_resume(folder):
                break
            command, targets = self.command(folder, resume=round_ > 0), [self.output(folder)]
            if kind == "window":
                run = launch(command, targets, folder, kill_at_event=rng.randint(1, max(1, self.reference.events)))
            else:
                span = (self.reference.last_change or 0.0) - (self.reference.first_change or 0.0)
                run = launch(command, targets, folder, kill_after=rng.uniform(0.0, span + 0.2))
            trial.kills += 1
            trial.landed += run.landed
            trial.points.append(run.kill_point or f"finished in {run.seconds:.1f}s")
            if not run.landed and run.rc != 0:
                trial.problems.append(f"run failed without a kill (rc {run.rc}): {last_line(run.stderr)}")
            trial.problems += [f"after kill at {run.kill_point}: {p}" for p in self.consistent(self.observe(folder))]
        self.finish(folder, trial.differences)
        if not trial.differences:
            trial.differences += self.compare(folder)
        return trial


def index_state(probe: Probe, folder: Path) -> dict[str, Any]:
    state = info(folder)
    if state["rc"] == 0 and "index" in state["json"]:
        answer = probe.ask(op="search", index=str(folder), queries=list(QUERIES), k=1000)
        state["search_error"] = answer.get("error")
        state["traceback"] |= bool(answer.get("traceback"))
        state["hits"] = answer.get("hits", {})
    return state


def same_scores(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is not None and y is not None and abs(x - y) <= TOLERANCE for x, y in zip(a, b))


class IndexScenario(Scenario):
    name = "index"
    exact = False  # True: readers must see exactly the old or exactly the new state

    def output(self, folder: Path) -> Path:
        return folder / "idx"

    def command(self, folder: Path, resume: bool = False) -> list[str]:
        return cli("index", self.fx.photos, "--model", self.fx.bundle0, "--index-dir", self.output(folder),
                   "--commit-every", 24, "--batch-size", 8, "--workers", 1)

    def observe(self, folder: Path) -> dict[str, Any]:
        return index_state(self.fx.probe, self.output(folder))

    @staticmethod
    def counts(state: dict[str, Any]) -> dict[str, int]:
        """The counts info reports (counted in SQLite where info does so; else the manifest's)."""
        return state["json"].get("counts") or state["json"]["index"]["counts"]

    def describe(self, state: dict[str, Any]) -> dict[str, Any]:
        manifest, counts = state["json"]["index"], self.counts(state)
        return {"items": counts["items"], "failures": counts["failures"],
                "model": manifest["model"]["fingerprint"], "index_type": manifest.get("index_type")}

    def differences(self, state: dict[str, Any], reference: dict[str, Any]) -> list[str]:
        if state["rc"] or reference["rc"]:
            return [] if state["rc"] == reference["rc"] else [f"info rc {state['rc']} ({state['error']})"]
        out = []
        mine, theirs = self.describe(state), self.describe(reference)
        out += [f"{key} {mine[key]} != {theirs[key]}" for key in mine if mine[key] != theirs[key]]
        hits, expected = state.get("hits", {}), reference.get("hits", {})
        if set(hits) != set(expected):
            out.append(f"{len(set(hits) ^ set(expected))} paths differ")
        bad = [p for p in set(hits) & set(expected) if not same_scores(hits[p], expected[p])]
        if bad:
            out.append(f"{len(bad)} items score differently (e.g. {Path(bad[0]).name})")
        return out

    def consistent(self, state: dict[str, Any]) -> list[str]:
        old, new = self.old_state, self.reference_state
        if state["traceback"]:
            return ["a traceback instead of one sentence"]
        if state["rc"]:
            return [] if old["rc"] else [f"info fails: {state['error']}"]
        problems = []
        if state.get("verify_rc"):
            problems.append(f"info --verify fails: {state['verify_error']}")
        items = self.counts(state)["items"]
        if state.get("search_error"):
            if items or not old["rc"]:  # an empty new index may say it has nothing published yet
                problems.append(f"search fails: {state['search_error']}")
            return problems
        hits = state["hits"]
        if len(hits) != items:
            problems.append(f"info reports {items} items, search returns {len(hits)}")
        if self.exact:
            versus_new, versus_old = self.differences(state, new), [] if old["rc"] else self.differences(state, old)
            if versus_new and (old["rc"] or versus_old):
                problems.append(f"neither the old nor the new state (new: {'; '.join(versus_new[:3])}"
                                + (f"; old: {'; '.join(versus_old[:3])})" if versus_old else ")"))
            return problems
        old_hits, new_hits = old.get("hits", {}), new["hits"]
        stray = [p for p in hits if p not in old_hits and p not in new_hits]
        wrong = [p for p in hits if p not in stray and not (same_scores(hits[p], old_hits.get(p, []))
                                                           or same_scores(hits[p], new_hits.get(p, [])))]
        lost = [p for p in set(old_hits) & set(new_hits) if p not in hits]
        for label, paths in (("unknown paths", stray), ("items with scores of neither state", wrong),
                             ("items of both states missing", lost)):
            if paths:
                problems.append(f"{len(paths)} {label} (e.g. {Path(paths[0]).name})")
        return problems

    def compare(self, folder: Path) -> list[str]:
        state = self.observe(folder)
        out = self.differences(state, self.reference_state)
        if state.get("verify_rc"):
            out.append(f"info --verify fails: {state['verify_error']}")
        return out


class UpdateScenario(IndexScenario):
    name = "update"

    def start(self, folder: Path) -> None:
        shutil.copytree(self.fx.index_a, self.output(folder))


class RebuildScenario(IndexScenario):
    name = "rebuild"
    exact = True

    def start(self, folder: Path) -> None:
        shutil.copytree(self.fx.index_b, self.output(folder))

    def command(self, folder: Path, resume: bool = False) -> list[str]:
        return cli("index", self.fx.photos, "--model", self.fx.bundle1, "--index-dir", self.output(folder),
                   "--rebuild", "--commit-every", 24, "--batch-size", 8, "--workers", 1)


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in VARYING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def close(a: Any, b: Any, where: str = "") -> str | None:
    """The first place two JSON values differ (numbers within TOLERANCE, relative for big ones)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(set(a) ^ set(b))[:3]}"
        return next((d for k in a if (d := close(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} entries, not {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := close(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return None if math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE) else f"{where}: {a} != {b}"
    return None if a == b else f"{where}: {str(a)[:60]} != {str(b)[:60]}"


class TrainScenario(Scenario):
    name = "train"
    resumes = True

    def output(self, folder: Path) -> Path:
        return folder / "run"

    def command(self, folder: Path, resume: bool = False) -> list[str]:
        return cli("train", "--data", self.fx.captions, "--config", self.fx.train_config, "-o", self.output(folder),
                   *(["--resume"] if resume else []))

    def can_resume(self, folder: Path) -> bool:
        return (self.output(folder) / "checkpoint" / "state.pt").is_file()

    def observe(self, folder: Path) -> dict[str, Any]:
        run = self.output(folder)
        state: dict[str, Any] = {"traceback": False}
        if not run.exists():
            return state
        written = [p for p in run.rglob("state.pt")]
        state["checkpoints_written"] = len(written)
        checkpoint = run / "checkpoint" / "state.pt"
        if checkpoint.is_file():
            answer = self.fx.probe.ask(op="checkpoint", path=str(checkpoint))
            state["checkpoint"] = answer.get("step", answer.get("error"))
        bundles = [p.parent for p in run.rglob("manifest.json") if p.parent.name != "best"]
        state["stray_bundles"] = len(bundles)
        if (run / "best").exists():
            shown = info(run / "best")
            state["best"] = shown
            state["traceback"] |= shown["traceback"]
        return state

    def consistent(self, state: dict[str, Any]) -> list[str]:
        problems = []
        if state["traceback"]:
            problems.append("a traceback instead of one sentence")
        if state.get("checkpoints_written") and not isinstance(state.get("checkpoint"), int):
            problems.append(f"{state['checkpoints_written']} checkpoint file(s) written but checkpoint/ does not load "
                            f"({state.get('checkpoint', 'missing')})")
        best = state.get("best")
        if best is not None and (best["rc"] or best.get("verify_rc")):
            problems.append(f"best/ does not verify: {best['error'] or best.get('verify_error')}")
        if state.get("stray_bundles") and best is None:
            problems.append("best/ is missing while a complete bundle sits in a hidden folder")
        return problems

    def compare(self, folder: Path) -> list[str]:
        run, reference = self.output(folder), self.output(self.reference_folder)
        out = []
        try:
            summary = json.loads((run / "summary.json").read_text())
            expected = json.loads((reference / "summary.json").read_text())
            if (d := close(without_timings(summary), without_timings(expected), "summary")):
                out.append(d)
        except (OSError, ValueError) as exc:
            out.append(f"summary.json: {exc}")
        records, expected = ([without_timings(json.loads(line)) for line in lines]
                             for lines in ((f / "metrics.jsonl").read_text().splitlines() for f in (run, reference)))
        if (d := close(records, expected, "metrics.jsonl")):
            steps, once = [r.get("step") for r in records], [r.get("step") for r in expected]
            repeated = sorted({s for s in steps if steps.count(s) > once.count(s)})
            out.append(d + (f" (steps logged again: {repeated[:6]})" if repeated else ""))
        for name, kind, rel in (("checkpoint", "checkpoint", "checkpoint/state.pt"),
                                ("best weights", "safetensors", "best/weights.safetensors")):
            answer = self.fx.probe.ask(op="diff", a=str(run / rel), b=str(reference / rel), kind=kind)
            if "error" in answer or answer.get("keys") or answer.get("max_abs", 0) > TOLERANCE:
                out.append(f"{name}: {answer}")
        return out


class ExportScenario(Scenario):
    name = "export"

    def output(self, folder: Path) -> Path:
        return folder / "onnx"

    def start(self, folder: Path) -> None:
        shutil.copytree(self.fx.export0, self.output(folder))

    def command(self, folder: Path, resume: bool = False) -> list[str]:
        return cli("export", "--model", self.fx.bundle1, "--out", self.output(folder))

    def observe(self, folder: Path) -> dict[str, Any]:
        out = self.output(folder)
        if not out.exists():
            return {"rc": None, "traceback": False}
        return info(out)

    @staticmethod
    def manifest(state: dict[str, Any]) -> Any:
        return without_timings(state.get("json", {}).get("export", state.get("json")))

    def consistent(self, state: dict[str, Any]) -> list[str]:
        if state["traceback"]:
            return ["a traceback instead of one sentence"]
        if state["rc"] is None:
            return ["the export folder is gone"]
        if state["rc"] or state.get("verify_rc"):
            return [f"the export folder does not verify: {state['error'] or state.get('verify_error')}"]
        if close(self.manifest(state), self.manifest(self.old_state)) and \
                close(self.manifest(state), self.manifest(self.reference_state)):
            return ["the export is neither the old one nor the new one"]
        return []

    def compare(self, folder: Path) -> list[str]:
        state = self.observe(folder)
        if state["rc"] or state.get("verify_rc"):
            return [f"the export does not verify: {state.get('error') or state.get('verify_error')}"]
        d = close(self.manifest(state), self.manifest(self.reference_state), "export.json")
        return [d] if d else []


# -- the fixture -------------------------------------------------------------------------------

class Fixture:
    """A tiny BERT, a colour data set, two tiny bundles trained through the CLI, a photo folder in
    two states (an index of the first, then files added, removed and changed), and an export."""

    def __init__(self, work: Path, images: int):
        self.work = work
        self.images = images
        self.probe = Probe()

    def make_data(self) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import make_colour_dataset, make_tiny_bert

        bert = make_tiny_bert(self.work / "bert")
        per_colour = max(4, math.ceil(self.images / 7))
        self.captions = make_colour_dataset(self.work / "data", per_colour=per_colour, size=64)
        self.train_config = self.work / "train.json"
        self.train_config.write_text(json.dumps({
            "model": {"text": {"encoder": "bert", "options": {"model_name": str(bert), "max_length": 16}},
                      "image": {"encoder": "timm:test_efficientnet",
                                "options": {"pretrained": False, "image_size": 48}},
                      "embed_dim": 16},
            "text": {"mode": "top:1", "lr": 1e-3}, "val_size": 14, "batch_size": 7, "epochs": 2, "eval_every": 3,
            "warmup_steps": 2, "workers": 0, "head_lr": 0.01, "log_every": 1}, indent=2))

    def make_photos(self) -> None:
        """State A: the data set's images (state B: see change_photos)."""
        self.photos = self.work / "photos"
        shutil.copytree(self.captions.parent / "images", self.photos)

    def change_photos(self) -> None:
        """State B: 8 files removed, 4 changed, 12 added."""
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(7)
        files = sorted(self.photos.iterdir())
        for path in files[:8]:
            path.unlink()
        for path in files[8:12]:
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
        for n in range(12):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(self.photos / f"added_{n}.jpg", quality=90)


def build_fixture(work: Path, images: int) -> Fixture:
    fx = Fixture(work, images)
    fx.make_data()
    fx.make_photos()
    return fx


SCENARIO_CLASSES: dict[str, Callable[[Fixture], Scenario]] = {
    "index": IndexScenario, "update": UpdateScenario, "rebuild": RebuildScenario, "train": TrainScenario,
    "export": ExportScenario}


def prepare(fx: Fixture, chosen: list[str], trace: bool) -> dict[str, Scenario]:
    """References in dependency order; bundles and starting states come out of them."""
    scenarios = {name: SCENARIO_CLASSES[name](fx) for name in SCENARIOS}
    started = time.monotonic()
    train = scenarios["train"]
    log("reference: train (its best/ is the first model)")
    train.make_reference(trace)
    fx.bundle0 = train.output(train.reference_folder) / "best"
    fx.bundle1 = fx.work / "seed1" / "best"
    if {"rebuild", "export"} & set(chosen):
        log("set-up: a second model (seed 1)")
        must_run(cli("train", "--data", fx.captions, "--config", fx.train_config, "--set", "seed=1",
                     "-o", fx.work / "seed1"))
    if "update" in chosen:
        log("set-up: an index of the photos before they change")
        fx.index_a = fx.work / "index-a"
        must_run(cli("index", fx.photos, "--model", fx.bundle0, "--index-dir", fx.index_a, "--workers", 1))
    fx.change_photos()
    if {"index", "rebuild"} & set(chosen):
        log("reference: index")
        scenarios["index"].make_reference(trace)
        fx.index_b = scenarios["index"].output(scenarios["index"].reference_folder)
    for name in ("update", "rebuild"):
        if name in chosen:
            log(f"reference: {name}")
            scenarios[name].make_reference(trace)
    if "export" in chosen:
        log("set-up: an export of the first model")
        fx.export0 = fx.work / "export0"
        must_run(cli("export", "--model", fx.bundle0, "--out", fx.export0))
        log("reference: export")
        scenarios["export"].make_reference(trace)
    for name in chosen:
        ref = scenarios[name].reference
        log(f"  {name}: {ref.seconds:.1f} s uninterrupted, output changes from {ref.first_change or 0:.1f} s "
            f"to {ref.last_change or 0:.1f} s" + (f", {ref.events} renames/fsyncs there" if trace else ""))
    log(f"set-up took {time.monotonic() - started:.0f} s")
    return {name: scenarios[name] for name in chosen}


def table(trials: list[Trial], chosen: list[str], kinds: list[str]) -> str:
    lines = ["| scenario | kill | trials | kills landed | inconsistent states | resumed == uninterrupted |",
             "|---|---|---:|---:|---:|---:|"]
    totals = [0, 0, 0, 0, 0]
    for name in chosen:
        for kind in kinds:
            rows = [t for t in trials if t.scenario == name and t.kind == kind]
            if not rows:
                continue
            counts = [len(rows), sum(t.kills for t in rows), sum(t.landed for t in rows),
                      sum(1 for t in rows if t.problems), sum(1 for t in rows if not t.differences)]
            totals = [a + b for a, b in zip(totals, counts)]
            lines.append(f"| {name} | {kind} | {counts[0]} | {counts[2]}/{counts[1]} | {counts[3]} | "
                         f"{counts[4]}/{counts[0]} |")
    lines.append(f"| **all** | | {totals[0]} | {totals[2]}/{totals[1]} | {totals[3]} | {totals[4]}/{totals[0]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--trials", type=int, default=3, help="trials per scenario and kill kind (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="draws of kill points (default 0)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help="random, window (window needs strace)")
    parser.add_argument("--images", type=int, default=100, help="photos in the folder indexed (default 100)")
    parser.add_argument("--work", type=Path, help="keep the fixture and every trial's folders here")
    parser.add_argument("--json", type=Path, help="write every trial (kill points, problems) to this file")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS] + [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown scenario or kind: {', '.join(unknown)}")
    if "window" in kinds and not strace_works():
        log("strace is missing or cannot trace here (ptrace refused): window kills are skipped")
        kinds.remove("window")
    work = args.work or Path(tempfile.mkdtemp(prefix="mmretrieve-faults-"))
    if args.work:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    fx = build_fixture(work.resolve(), args.images)
    trials: list[Trial] = []
    try:
        scenarios = prepare(fx, chosen, trace="window" in kinds)
        for name, scenario in scenarios.items():
            for kind in kinds:
                for number in range(args.trials):
                    rng = random.Random(f"{args.seed}-{name}-{kind}-{number}")
                    trial = scenario.trial(kind, rng, number)
                    trials.append(trial)
                    verdict = "ok" if not trial.problems and not trial.differences else "FAIL"
                    log(f"{name} {kind} #{number}: {verdict}; killed at {' | '.join(trial.points)}")
                    for problem in trial.problems:
                        log(f"    inconsistent: {problem}")
                    for difference in trial.differences:
                        log(f"    differs from uninterrupted: {difference}")
    finally:
        fx.probe.close()
        if args.json:
            args.json.write_text(json.dumps([t.__dict__ for t in trials], indent=2))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(trials, chosen, kinds))
    print(f"\n{len(trials)} trials, seed {args.seed}, {time.monotonic() - started:.0f} s")
    return 0 if all(not t.problems and not t.differences for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
