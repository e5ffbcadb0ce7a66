"""Multi-node training as torchrun runs it: two launchers ("nodes", one process each) meet at a
c10d rendezvous on loopback and train over gloo, as docs/scaling.md describes for a cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import free_port
from tiny_models import TINY_TIMM, make_colour_dataset

pytestmark = pytest.mark.slow


def write_config(path: Path, data: Path, output: Path, tiny_bert_dir: Path) -> Path:
    path.write_text(json.dumps({
        "data": str(data), "val_size": 14, "batch_size": 7, "epochs": 1, "warmup_steps": 1, "workers": 0,
        "head_lr": 0.01, "output": str(output), "log_every": 1, "seed": 3,
        "text": {"mode": "full", "lr": 1e-3},
        "model": {"embed_dim": 16,
                  "text": {"encoder": "bert", "options": {"model_name": str(tiny_bert_dir), "max_length": 16}},
                  "image": {"encoder": f"timm:{TINY_TIMM}", "options": {"pretrained": False, "image_size": 48}}},
    }))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run / "best").rglob("*.safetensors")):
        tensors.update({f"{file.relative_to(run)}:{k}": v for k, v in load_file(file).items()})
    assert tensors, f"no weights under {run / 'best'}"
    return tensors


def test_two_torchrun_nodes_train_like_one_node_with_two_processes(tmp_path, tiny_bert_dir):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    data = make_colour_dataset(tmp_path / "data", per_colour=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "mmretrieve", "train", "--json", "--config"]

    port = free_port()
    multi = write_config(tmp_path / "multi.yaml", data, tmp_path / "multi", tiny_bert_dir)
    nodes = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mmretrieve-test", "--node-rank", str(rank),
         *train, str(multi)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    # Rank 0 reports for everyone; which launcher holds it is the rendezvous's choice.
    reports = [json.loads(out[out.index("{"):]) for out, _ in outputs if "{" in out]
    assert len(reports) == 1
    # 28 training images / (7 per batch x 2 ranks) = 2 steps: the two nodes formed one world of 2.
    assert reports[0]["steps"] == 2

    single = write_config(tmp_path / "single.yaml", data, tmp_path / "single", tiny_bert_dir)
    result = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *train, str(single)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout[result.stdout.index("{"):])["steps"] == 2
    # The same data, seed and world size: the same model as one node running two processes.
    multi_weights, single_weights = weights(tmp_path / "multi"), weights(tmp_path / "single")
    assert multi_weights.keys() == single_weights.keys()
    for name, tensor in multi_weights.items():
        torch.testing.assert_close(tensor, single_weights[name], rtol=1e-5, atol=1e-6, msg=name)
