"""SIGKILL at deterministic points of a real CLI process, then what readers see and how a re-run ends.

The killed command runs as a subprocess of the CLI with an audit hook (``sys.addaudithook``) that
stops the process at the n-th matching event (a file opened, a folder renamed) and tells the test
so; the test then kills it with SIGKILL. The long, randomised version of these checks is
``benchmarks/fault_injection.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_image

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")]

# Runs the CLI after installing an audit hook that parks the process, for good, at the n-th event
# named in FAULT_EVENTS whose arguments mention FAULT_MATCH (and creates FAULT_MARKER then).
PAUSING_CLI = r"""
import os, sys, time, runpy
events = set(os.environ["FAULT_EVENTS"].split(","))
match, wanted, marker = os.environ["FAULT_MATCH"], int(os.environ["FAULT_AT"]), os.environ["FAULT_MARKER"]
seen = 0
if os.environ.get("FAULT_NO_EXCHANGE"):  # as on a system without renameat2: two renames per replacement
    from mmretrieve import atomic
    atomic._exchange = lambda first, second: False
def hook(event, args):
    global seen
    if event not in events:
        return
    text = " ".join(os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else repr(a) for a in args)
    if match in text:
        seen += 1
        if seen == wanted:
            with open(marker, "w") as handle:
                handle.write(f"{event} {text}")
            while True:
                time.sleep(60)
sys.addaudithook(hook)
sys.argv = ["mmretrieve", *sys.argv[1:]]
runpy.run_module("mmretrieve", run_name="__main__")
"""


def kill_at(args: list[str], events: str, match: str, at: int, tmp_path: Path, timeout: float = 120,
            no_exchange: bool = False) -> str:
    """Run ``mmretrieve ARGS`` until the audit hook parks it, SIGKILL it; return the event it stopped at.
    no_exchange: folders are replaced by the two-rename fallback, as where renameat2 is missing."""
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    env = {**os.environ, "FAULT_EVENTS": events, "FAULT_MATCH": match, "FAULT_AT": str(at),
           "FAULT_MARKER": str(marker), **({"FAULT_NO_EXCHANGE": "1"} if no_exchange else {})}
    log = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, *map(str, args)], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    paused = marker.exists()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert paused, (f"the command never reached event {at} ({events} on {match}); rc {proc.returncode}: "
                    f"{log.read_text()[-800:]}")
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def cli(*args):
    from mmretrieve.cli import cli as command

    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def index_view(folder: Path) -> dict:
    """What a reader sees: info's counts and model, every item's scores for three queries."""
    import mmretrieve.api as mm

    manifest = json.loads(cli("info", folder, "--json").stdout)["index"]
    index = mm.open_index(folder)
    try:
        scores: dict[str, list[float]] = {}
        for query in ("a red dog", "a blue car", "two people on a beach"):
            for hit in index.search(query, k=100):
                scores.setdefault(hit.path, []).append(hit.score)
    finally:
        index.reader.close()
    return {"items": manifest["counts"]["items"], "model": manifest["model"]["fingerprint"], "scores": scores}


def assert_same_view(seen: dict, expected: dict) -> None:
    assert (seen["items"], seen["model"]) == (expected["items"], expected["model"])
    assert seen["scores"].keys() == expected["scores"].keys()
    for path, scores in expected["scores"].items():
        np.testing.assert_allclose(seen["scores"][path], scores, atol=1e-5, err_msg=path)


@pytest.fixture
def two_bundles(tiny_model_config, tmp_path):
    import torch

    from mmretrieve.bundle import save_bundle
    from mmretrieve.model import build_model

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(save_bundle(build_model(tiny_model_config), tmp_path / f"bundle{seed}").path)
    return [Path(f) for f in folders]


def test_a_killed_rebuild_leaves_the_old_index_answering_and_a_rerun_equals_an_uninterrupted_one(
        two_bundles, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(12):
        random_image(100 + n).save(photos / f"p{n:02d}.png")
    old, killed, straight = tmp_path / "old", tmp_path / "killed", tmp_path / "straight"
    common = ["--workers", 0, "--batch-size", 2, "--commit-every", 2]
    cli("index", photos, "--model", two_bundles[0], "--index-dir", old, *common)
    before = index_view(old)
    assert before["items"] == 12
    shutil.copytree(old, killed)
    shutil.copytree(old, straight)
    rebuild = ["index", photos, "--model", two_bundles[1], "--rebuild", *common]

    # Parked when it opens its 7th photo: three batches of the new model embedded by then.
    kill_at([*rebuild, "--index-dir", killed], "open", str(photos), 7, tmp_path)
    assert_same_view(index_view(killed), before)  # readers still get the old, complete index
    cli("info", killed, "--verify")

    cli(*rebuild, "--index-dir", killed)
    cli(*rebuild, "--index-dir", straight)
    after = index_view(straight)
    assert after["model"] != before["model"] and after["items"] == 12
    assert_same_view(index_view(killed), after)


@pytest.mark.parametrize("replacement", ["exchange", "fallback"])
def test_a_train_killed_while_replacing_its_checkpoint_resumes_to_the_uninterrupted_result(
        tiny_bert_dir, tmp_path, replacement, caplog):
    import torch

    from mmretrieve import atomic

    if replacement == "exchange" and atomic._renameat2() is None:
        pytest.skip("no renameat2 in this libc: the fallback variant covers this system")

    from tiny_models import TINY_TIMM, make_colour_dataset

    captions = make_colour_dataset(tmp_path / "data", per_colour=4, size=32)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "model": {"text": {"encoder": "bert", "options": {"model_name": str(tiny_bert_dir), "max_length": 16}},
                  "image": {"encoder": f"timm:{TINY_TIMM}", "options": {"pretrained": False, "image_size": 32}},
                  "embed_dim": 16},
        "val_size": 7, "batch_size": 7, "epochs": 2, "eval_every": 1, "warmup_steps": 1, "workers": 0,
        "head_lr": 0.01}))
    train = ["train", "--data", captions, "--config", config]

    # A checkpoint after every step (3 per epoch); the first replaces nothing, the second replaces it.
    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoint" / "state.pt"
    if replacement == "exchange":
        # Parked as the old checkpoint (swapped out under the staging name) is about to be deleted.
        stopped = kill_at([*train, "-o", killed], "shutil.rmtree", ".checkpoint.tmp-", 1, tmp_path)
        assert checkpoint.is_file(), sorted(p.name for p in killed.iterdir())
    else:
        # Parked before the new checkpoint (.checkpoint.new-*) is renamed in, the old one already
        # moved aside (.checkpoint.old-*): no folder named checkpoint, until a recovery.
        stopped = kill_at([*train, "-o", killed], "os.rename", ".checkpoint.new-", 2, tmp_path, no_exchange=True)
        names = sorted(p.name for p in killed.iterdir())
        assert not checkpoint.parent.exists(), names
        assert any(".checkpoint.old-" in n for n in names) and any(".checkpoint.new-" in n for n in names), names
    assert ".checkpoint." in stopped
    cli("info", tmp_path / "killed" / "best", "--verify")

    with caplog.at_level(logging.WARNING, logger="mmretrieve"):
        cli(*train, "-o", tmp_path / "killed", "--resume")  # recovers the checkpoint the kill left aside
    assert f"resuming {killed} at step 2" in caplog.text  # the new one, complete: not a start over
    cli(*train, "-o", tmp_path / "straight")
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("killed", "straight")]
    assert [(s["steps"], s["best_step"], s["best"]) for s in summaries[:1]] == \
        [(s["steps"], s["best_step"], s["best"]) for s in summaries[1:]]
    states = [torch.load(tmp_path / run / "checkpoint" / "state.pt", weights_only=True)["model"]
              for run in ("killed", "straight")]
    assert states[0].keys() == states[1].keys()
    for name in states[1]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-5, atol=1e-6, msg=name)
