"""DistributedDataParallel on CPU with the gloo backend and 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import TINY_TIMM, make_colour_dataset

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_loss_worker(rank: int, world: int, port: int, loss_name: str, out_dir: str) -> None:
    import torch.distributed as dist

    from mmretrieve.train.distributed import DistInfo
    from mmretrieve.train.losses import InfoNCELoss, SigLIPLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    local = slice(rank * 4, rank * 4 + 4)
    mine_i = images[local].clone().requires_grad_(True)
    mine_t = texts[local].clone().requires_grad_(True)
    loss_cls = InfoNCELoss if loss_name == "infonce" else SigLIPLoss
    loss = loss_cls(dist_info=DistInfo(rank, world, rank))(mine_i, mine_t, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "grad_i": mine_i.grad, "grad_t": mine_t.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", ["infonce", "siglip"])
def test_gathered_loss_equals_the_single_process_loss(tmp_path, loss_name):
    import torch.multiprocessing as mp

    from mmretrieve.train.losses import InfoNCELoss, SigLIPLoss

    mp.spawn(_gathered_loss_worker, args=(2, free_port(), loss_name, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1).requires_grad_(True)
    texts = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1).requires_grad_(True)
    loss = (InfoNCELoss() if loss_name == "infonce" else SigLIPLoss())(images, texts, torch.tensor(10.0))
    loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss.detach())
        # Each rank's features get exactly their share of the full-batch gradient.
        torch.testing.assert_close(result["grad_i"], images.grad[rank * 4:rank * 4 + 4])
        torch.testing.assert_close(result["grad_t"], texts.grad[rank * 4:rank * 4 + 4])


def test_torchrun_trains_with_two_processes(tmp_path, tiny_bert_dir):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun comes with torch"
    data = make_colour_dataset(tmp_path / "data", per_colour=6)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "data": str(data), "val_size": 14, "batch_size": 7, "epochs": 4, "warmup_steps": 2, "workers": 0,
        "head_lr": 0.01, "output": str(tmp_path / "run"), "log_every": 1,
        "text": {"mode": "full", "lr": 1e-3},
        "model": {"embed_dim": 16,
                  "text": {"encoder": "bert", "options": {"model_name": str(tiny_bert_dir), "max_length": 16}},
                  "image": {"encoder": f"timm:{TINY_TIMM}", "options": {"pretrained": False, "image_size": 48}}},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmretrieve", "train", "--config", str(config),
         "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    # 28 training images / (7 per batch x 2 processes) = 2 steps per epoch.
    assert summary["steps"] == 8 and summary["best"] is not None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("pairs_per_s") for r in records)
    assert (tmp_path / "run" / "best" / "manifest.json").is_file()
