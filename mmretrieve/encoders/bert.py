"""`bert`: any BERT-family checkpoint through transformers, CLS or mean pooling."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..preprocess import TextPreprocessConfig, TextPreprocessor
from .base import Encoder
from .hub import load_from_hub

POOLINGS = ("mean", "cls")


# Captions per run when a training batch is split by length. A random batch of 128 Flickr8k
# captions pads to ~28 tokens where they average 14; four sorted runs of 32 pad to ~17 on average.
TRAINING_RUN = 32


class TextTower(nn.Module):
    """Transformer plus pooling: (input_ids, attention_mask) -> (batch, hidden)."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.training and input_ids.shape[0] > TRAINING_RUN and not _tracing():
            return self._forward_in_runs(input_ids, attention_mask)
        return self._forward(input_ids, attention_mask)

    def _forward_in_runs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The same pooled vectors, computed in runs of similar length, each cut to its longest text:
        padding is masked out of attention and pooling, so it only costs time (right padding)."""
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        pooled = []
        for run in order.split(TRAINING_RUN):
            width = max(int(lengths[run].max()), 1)
            pooled.append(self._forward(input_ids[run, :width], attention_mask[run, :width]))
        return torch.cat(pooled)[torch.argsort(order)]

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-6)


def _tracing() -> bool:
    """An export traces one graph for every batch: no data-dependent runs there."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or \
        torch.compiler.is_compiling()


def _fast_tokenizer(model_name: str):
    """The tokenizers.Tokenizer behind a checkpoint, converting a slow vocab if needed."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    local = Path(model_name) / "tokenizer.json"
    if local.is_file():
        return Tokenizer.from_file(str(local))
    tokenizer = AutoTokenizer.from_pretrained(model_name, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"{model_name}: no fast tokenizer available (tokenizer.json)")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"))
        return Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))


@contextlib.contextmanager
def quiet_transformers():
    """transformers' loading prints a progress bar and a report of the weights a model leaves out
    on purpose (here the pooler: add_pooling_layer=False; CLIP pairs' unused parts in
    mmretrieve.pairs.hf); neither helps a user, so both are off while loading."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class BertEncoder(Encoder):
    family = "bert"
    modality = "text"
    input_names = ("input_ids", "attention_mask")
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}

    def __init__(self, model_name: str, pooling: str = "mean", max_length: int = 77, pretrained: bool = True):
        """model_name: hub id or local folder; pretrained=False builds from config.json with random weights."""
        from transformers import AutoConfig, AutoModel

        if pooling not in POOLINGS:
            raise InputError(f"bert pooling must be one of {POOLINGS}, not {pooling!r}")
        if model_name.startswith("~"):
            model_name = os.path.expanduser(model_name)  # ~/models/bert, as a shell would

        def load():
            config = AutoConfig.from_pretrained(model_name)
            with quiet_transformers():
                model = AutoModel.from_pretrained(model_name, add_pooling_layer=False) if pretrained \
                    else AutoModel.from_config(config, add_pooling_layer=False)
            return config, model, _fast_tokenizer(model_name)

        if not Path(model_name).is_dir() and (Path(model_name).is_absolute() or model_name.startswith((".", "~"))):
            raise InputError(f"cannot load BERT checkpoint {model_name!r}: no such folder")  # a path, not a hub id
        try:
            # A hub id: the cache first, the hub only if it answers (its retries take ~30 s).
            config, model, tokenizer = load() if Path(model_name).is_dir() else \
                load_from_hub(load, f"the BERT checkpoint {model_name!r}")
        except OSError as exc:
            raise InputError(f"cannot load BERT checkpoint {model_name!r}: {str(exc).splitlines()[0]}") from None
        max_length = min(int(max_length), int(getattr(config, "max_position_embeddings", max_length)))
        self.options = {"model_name": model_name, "pooling": pooling, "max_length": max_length}
        super().__init__(TextTower(model, pooling), TextPreprocessor(tokenizer, TextPreprocessConfig(max_length)),
                         config.hidden_size)

    lora_targets = ("query", "key", "value")

    def layer_groups(self) -> list[list[str]]:
        names = [name for name, _ in self.module.named_parameters()]
        layers = self.module.model.encoder.layer
        groups = [[n for n in names if n.startswith("model.embeddings.")]]
        groups += [[n for n in names if n.startswith(f"model.encoder.layer.{i}.")] for i in range(len(layers))]
        covered = {n for group in groups for n in group}
        rest = [n for n in names if n not in covered]  # e.g. a final norm some variants have
        return groups + ([rest] if rest else [])

    def enable_grad_checkpointing(self) -> None:
        model = self.module.model
        # transformers 5 renamed the method; older releases only have the first name.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()

    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]:
        return self.preprocess(["an example caption"] * (batch - 1) + ["a longer example caption with more words"])

    def save_architecture(self, folder: Path) -> dict[str, Any]:
        folder = Path(folder)
        self.module.model.config.save_pretrained(folder)
        self.preprocessor.save(folder)
        return {"pooling": self.options["pooling"], "max_length": self.options["max_length"]}

    @classmethod
    def from_bundle(cls, folder: Path, options: dict[str, Any]) -> "BertEncoder":
        """The config.json and tokenizer saved in the tower folder stand in for the checkpoint."""
        return super().from_bundle(folder, {**options, "model_name": str(folder)})
