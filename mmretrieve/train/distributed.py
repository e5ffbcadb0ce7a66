"""torchrun / DistributedDataParallel plumbing: who am I, and gathering features with gradients."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op when run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_features(features: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All ranks' features in rank order, with this rank's own slice still carrying gradients.

    all_gather returns detached copies; putting the local tensor back in its place lets each
    rank back-propagate the full-batch loss into its own features (open_clip's scheme).
    """
    if not info.enabled:
        return features
    gathered = [torch.empty_like(features) for _ in range(info.world_size)]
    dist.all_gather(gathered, features.contiguous())
    gathered[info.rank] = features
    return torch.cat(gathered, dim=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's decision (stop early, say) for every rank."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0])
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
