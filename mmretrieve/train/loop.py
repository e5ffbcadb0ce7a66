"""The training loop: set-up, baseline evaluation, steps, validation, checkpoints, early stop."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_text_atomic
from ..augment import ViewAugmentation
from ..bundle import check_reproducible, load_bundle, save_bundle, tower_fingerprint
from ..config import TrainConfig, to_dict
from ..data import CaptionSet, all_captions, load_captions, split_by_image
from ..embedding import cached_tower_features, cached_view_features
from ..errors import ConfigError, InputError
from ..evaluate import evaluate_model
from ..metrics import mean_recall
from ..model import build_model
from ..plugins import get_host
from ..progress import progress_bar
from . import checkpoint as ckpt
from .distributed import DistInfo, barrier, broadcast_flag, cleanup, init_distributed
from .pipeline import Collate, EpochBatches, PairDataset, caption_offsets
from .trainable import apply_training_mode, has_lora, merge_lora_in_place, parse_mode

log = logging.getLogger(__name__)

# Settings that may change between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = {"epochs", "max_steps", "patience", "workers", "log_every", "device", "eval_every",
                     "bundle_towers"}
BUNDLE_TOWERS = ("auto", "embed", "reference")
# The bundle manifest's metadata key for a model's sigmoid-loss logit bias (a SigLIP pair's).
LOGIT_BIAS_KEY = "logit_bias"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during the steps, after the checkpoint of the last finished step was saved."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"interrupted at step {step}")
        self.checkpoint = checkpoint  # None on ranks other than 0, which save nothing
        self.step = step


@dataclass
class TrainResult:
    output: str
    best_bundle: str | None
    baseline: dict | None
    best: dict | None
    best_step: int
    steps: int
    seconds: float
    stopped_early: bool
    gain: dict | None = None  # best minus start, per direction and metric (R@K in points, median rank)


def metric_gain(start: dict | None, best: dict | None) -> dict | None:
    """``best - start`` for every number both evaluations have: {"t2i": {"R@1": +12.5, ...}, ...}."""
    if not start or not best:
        return None
    return {direction: {name: round(value - start[direction][name], 2) for name, value in metrics.items()
                        if name in start.get(direction, {})}
            for direction, metrics in best.items() if direction in start}


def resolve_device(setting: str, dist: DistInfo) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for, but no CUDA device is visible")
        if dist.enabled:
            device = torch.device("cuda", dist.local_rank)
    return device


def choose_precision(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. BERT under fp16 is prone to NaN, so bf16 is
    preferred wherever the GPU has it; the loss and temperature are computed in fp32 regardless."""
    if setting == "fp32" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting in ("bf16", "fp16"):
        if setting == "fp16" and device.type != "cuda":
            raise ConfigError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.bfloat16 if setting == "bf16" else torch.float16
    raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, not {setting!r}")


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def open_tensorboard(folder: Path, purge_step: int | None = None):
    """A SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps up to ``step`` (a checkpoint's), dropping those an interrupted run
    logged after it and a line cut short by a kill; rewritten atomically. Returns lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


def flatten_numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"val": {"t2i": {"R@1": 3}}} -> {"val/t2i/R@1": 3}, numbers only."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class ContrastiveStep(nn.Module):
    """One forward pass to the loss. Frozen towers are replaced by their cached features."""

    def __init__(self, model, loss: nn.Module, image_cache: torch.Tensor | None, text_cache: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.image_cache = image_cache  # plain attributes: DDP must not broadcast them
        self.text_cache = text_cache

    def embed(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        # model.project: the heads, and the label bridge's fixed part beside them if the model has one.
        if self.image_cache is not None:
            rows = batch["image_row"].to(self.image_cache.device)
            # Several cached views (images, views, dim): the one the sampler drew for this epoch.
            features = self.image_cache[rows, batch["image_view"].to(rows.device)] if "image_view" in batch \
                else self.image_cache[rows]
            image = model.project("image", features.to(device), normalize=False)
        else:
            image = model.project("image", model.image_tower(**{k: v.to(device) for k, v in batch["image_inputs"].items()}),
                                  normalize=False)
        if self.text_cache is not None:
            text = model.project("text", self.text_cache[batch["caption_row"].to(self.text_cache.device)].to(device),
                                 normalize=False)
        else:
            text = model.project("text", model.text_tower(**{k: v.to(device) for k, v in batch["text_inputs"].items()}),
                                 normalize=False)
        return nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1)

    def forward(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        image, text = self.embed(batch, device)
        return self.loss(image, text, self.model.temperature_scale())


def parameter_groups(model, loss: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: per-tower and head learning rates; no decay on norms, biases, temperature."""
    owners = [("text", model.text_tower, config.text.lr), ("image", model.image_tower, config.image.lr),
              ("heads", nn.ModuleList([model.text_head, model.image_head]), config.head_lr)]
    groups = []
    for name, module, lr in owners:
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        if decay:
            groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": config.weight_decay})
        if no_decay:
            groups.append({"name": f"{name}-no-decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    extra = [model.logit_scale, *[p for p in loss.parameters() if p.requires_grad]]
    groups.append({"name": "temperature-and-loss", "params": extra, "lr": config.head_lr, "weight_decay": 0.0})
    return groups


def bundle_view(model):
    """The model as a bundle should store it: LoRA adapters merged into their base layers."""
    if not (has_lora(model.text_tower) or has_lora(model.image_tower)):
        return model
    merged = copy.deepcopy(model)
    merge_lora_in_place(merged.text_tower)
    merge_lora_in_place(merged.image_tower)
    return merged


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with the keys it lacks taken from ``defaults``, at every level: a setting added to
    a nested section (text, image, model) since a run was written had its default then too."""
    merged = {**defaults, **saved}
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            merged[key] = _with_defaults(value, defaults[key])
    return merged


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        if not config.data:
            raise ConfigError("no training data: give --data FILE (JSONL, CSV, COCO JSON or a folder)")
        self.config = config
        if config.bundle_towers not in BUNDLE_TOWERS:
            raise ConfigError(f"bundle_towers must be auto, embed or reference, not {config.bundle_towers!r}")
        self.view_augmentation = self._check_image_views()
        self.output = Path(config.output)
        self.dist = init_distributed("cuda" if config.device.startswith("cuda") or
                                     (config.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(config.device, self.dist)
        self.amp_dtype = choose_precision(config.precision, self.device)
        self.main = self.dist.is_main
        self._check_output(resume)
        self._seed(config.seed)
        self.train_set, self.val_items = self._load_data()
        self.model = self._build_model()
        self.reference_towers = self._reference_towers()
        for name in self.reference_towers:
            check_reproducible(getattr(self.model.config, name))
        self.frozen = {name: parse_mode(getattr(config, name).mode)[0] == "frozen" for name in ("text", "image")}
        for name in ("text", "image"):
            encoder = getattr(self.model, f"{name}_encoder")
            count = apply_training_mode(encoder, getattr(config, name))
            log.info("%s tower: %s, %d trainable parameters", name, getattr(config, name).mode, count)
        loss_spec = get_host().registry("loss").get(config.loss)
        self.loss = loss_spec.build(dist_info=self.dist, **self._loss_options(loss_spec))
        self.model.to(self.device)
        self.loss.to(self.device)
        self._prepare_caches()
        self.step_module = ContrastiveStep(self.model, self.loss, self.caches.get("image"), self.caches.get("text"))
        self.ddp = self._wrap_ddp()
        self.sampler = EpochBatches([len(i.captions) for i in self.train_set.items], config.batch_size, config.seed,
                                    self.dist.rank, self.dist.world_size, views=config.image_views)
        per_epoch = self.sampler.batches_per_epoch // config.grad_accum
        if per_epoch == 0:
            raise ConfigError("grad_accum is larger than the number of batches in an epoch")
        self.total_steps = config.max_steps or config.epochs * per_epoch
        self.eval_every = config.eval_every or per_epoch
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, self.loss, config), betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(config.warmup_steps,
                                                                                         self.total_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": 0, "baseline": None,
                      "bad_evals": 0, "seconds": 0.0}
        if resume:
            self._resume()
        # On resume, events logged after the checkpoint's step (by the interrupted run) are dropped.
        self.tensorboard = open_tensorboard(self.output / "tensorboard", self.state["step"] + 1 if resume else None) \
            if self.main else None

    # -- set-up ------------------------------------------------------------------------------
    def _check_output(self, resume: bool) -> None:
        has_run = ckpt.has_checkpoint(self.output / "checkpoint")
        if resume and not has_run:
            started = (self.output / "train_config.json").is_file()
            raise ConfigError(f"nothing to resume: {self.output} holds no checkpoint" +
                              ("; the run there stopped before its first, so run the command again without --resume"
                               if started else ""))
        if not resume and has_run:
            raise ConfigError(f"{self.output} already holds a run; pass --resume to continue it or choose another output")
        if resume:
            # A setting added since the run started had its default then.
            saved = _with_defaults(json.loads((self.output / "train_config.json").read_text()), to_dict(TrainConfig()))
            now = to_dict(self.config)
            changed = [k for k in now if k not in RESUMABLE_CHANGES and now[k] != saved.get(k)]
            if changed:
                raise ConfigError(f"cannot resume {self.output}: {changed[0]} differs from the run's "
                                  f"({saved.get(changed[0])!r} then, {now[changed[0]]!r} now)")
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            if not resume:  # lines a run stopped before its first checkpoint had logged
                truncate_metrics(self.output / "metrics.jsonl", -1)
            write_text_atomic(self.output / "train_config.json", json.dumps(to_dict(self.config), indent=2))

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _load_data(self) -> tuple[CaptionSet, list]:
        config = self.config
        train = load_captions(config.data, strict=config.strict_data, progress=self.main)
        if train.skipped and self.main:
            log.warning("%s", train.summary())
        if config.val_data:
            val = load_captions(config.val_data, strict=config.strict_data, progress=self.main).items
            return train, val
        train_items, val_items = split_by_image(train.items, config.val_fraction, config.seed, config.val_size)
        train.items = train_items
        return train, val_items

    def _build_model(self):
        if self.config.init:
            return load_bundle(self.config.init)
        return build_model(self.config.model)

    def _init_bundle(self):
        """The manifest and model description of the --init bundle (a pretrained pair's included), or None."""
        return getattr(self.model, "bundle", None) if self.config.init else None

    def _reference_towers(self) -> tuple[str, ...]:
        """The towers the run's bundles store by reference to their registered encoder: both with
        ``reference``, none with ``embed``; with ``auto`` those the --init bundle itself stores by
        reference (a pretrained pair's towers refer to its checkpoint), so a fine-tuned pair stays small."""
        setting = self.config.bundle_towers
        if setting != "auto":
            return ("text", "image") if setting == "reference" else ()
        info = self._init_bundle()
        if info is None:
            return ()
        return tuple(name for name in ("text", "image") if "reference" in info.model["towers"][name])

    def _loss_options(self, loss_spec) -> dict[str, Any]:
        """``loss_options``, plus the --init model's own logit bias (a SigLIP pair's) as ``init_bias``
        for a loss that takes one, unless the options set it: fine-tuning starts where the checkpoint is."""
        from ..specs import resolve_factory, unaccepted_options

        options = dict(self.config.loss_options)
        info = self._init_bundle()
        bias = (info.manifest.get("metadata") or {}).get(LOGIT_BIAS_KEY) if info is not None else None
        if bias is not None and "init_bias" not in options and \
                not unaccepted_options(resolve_factory(loss_spec.factory), ["init_bias"]):
            options["init_bias"] = float(bias)
            log.info("%s loss: bias starts at the checkpoint's %.4f", loss_spec.name, float(bias))
        return options

    def _check_image_views(self) -> ViewAugmentation | None:
        """The augmentation of ``image_views`` > 1 (None for one view); refused unless the image
        tower is frozen and cached, since the views exist only as cached features."""
        config = self.config
        views = config.image_views
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ConfigError(f"image_views must be a whole number of at least 1, not {views!r}")
        if views == 1:
            return None
        if parse_mode(config.image.mode)[0] != "frozen" or not config.cache_frozen:
            here = f"image.mode = {config.image.mode!r}" if config.cache_frozen else "cache_frozen = false"
            raise ConfigError(f"image_views = {views} needs the image tower frozen and cached (image.mode = 'frozen', "
                              f"cache_frozen = true; here {here}), because augmented views exist only as cached "
                              f"features")
        return ViewAugmentation(config.image_view_scale, config.image_view_ratio, config.image_view_flip)

    def _prepare_caches(self) -> None:
        """Features of frozen towers, for training and validation items, computed once."""
        self.caches: dict[str, torch.Tensor] = {}
        self.val_caches: dict[str, torch.Tensor] = {}
        if not self.config.cache_frozen:
            return
        cache_dir = self.output / "cache"
        for name in ("image", "text"):
            if not self.frozen[name]:
                continue
            encoder = getattr(self.model, f"{name}_encoder")
            fingerprint = tower_fingerprint(encoder)
            for split, items, target in (("train", self.train_set.items, self.caches),
                                         ("val", self.val_items, self.val_caches)):
                inputs = [i.image for i in items] if name == "image" else all_captions(items)
                views = self.config.image_views if (name, split) == ("image", "train") else 1

                def features(workers: int) -> torch.Tensor:
                    if views > 1:  # validation sees only the plain view, as indexing does
                        return cached_view_features(encoder, inputs, cache_dir, 64, self.device, f"{name}-{split}",
                                                    fingerprint, views, self.view_augmentation, workers)
                    return cached_tower_features(encoder, inputs, cache_dir, 64, self.device, f"{name}-{split}",
                                                 fingerprint, workers)

                if self.main:
                    target[name] = features(self.config.workers)
                barrier(self.dist)
                if not self.main:
                    target[name] = features(0)
                target[name] = target[name].to(self.device)

    def _wrap_ddp(self):
        if not self.dist.enabled:
            return self.step_module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.step_module, device_ids=ids)

    def _loader(self):
        from torch.utils.data import DataLoader

        image_live = "image" not in self.caches
        text_live = "text" not in self.caches
        dataset = PairDataset(self.train_set.items, self.model.image_encoder if image_live else None,
                              caption_offsets(self.train_set.items))
        collate = Collate(self.model.text_encoder.preprocessor if text_live else None)
        workers = self.config.workers if image_live else 0
        return DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
                          persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                          generator=torch.Generator().manual_seed(self.config.seed),
                          pin_memory=self.device.type == "cuda")

    def _set_train_modes(self) -> None:
        self.model.train()
        for name in ("text", "image"):
            tower = getattr(self.model, f"{name}_tower")
            if self.frozen[name]:
                tower.eval()
                continue
            # Normalisation statistics of layers that do not train stay as they are.
            for module in tower.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters()):
                    module.eval()

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoint_state(self, rng: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": ckpt.trainable_state(self.model),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "trainer": json.dumps(self.state),
        }

    def _save_checkpoint(self, rng: dict[str, Any]) -> None:
        if self.main:
            ckpt.save_checkpoint(self.output / "checkpoint", self._checkpoint_state(rng))

    def _resume(self) -> None:
        saved = ckpt.load_checkpoint(self.output / "checkpoint")
        missing = [k for k in saved["model"] if k not in self.model.state_dict()]
        if missing:
            raise ConfigError(f"checkpoint in {self.output} does not fit this model (e.g. {missing[0]})")
        self.model.load_state_dict(saved["model"], strict=False)
        self.loss.load_state_dict(saved["loss"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = json.loads(saved["trainer"])
        ckpt.restore_rng_state(saved["rng"])
        if self.main:
            log.warning("resuming %s at step %d", self.output, self.state["step"])
            dropped = truncate_metrics(self.output / "metrics.jsonl", self.state["step"])
            if dropped:
                log.info("metrics.jsonl: %d lines logged after the checkpoint dropped", dropped)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]] | None:
        metrics = None
        if self.main:
            cached = {f"{k}_features": v for k, v in self.val_caches.items()}
            metrics = self._choose_bridge_weight(lambda: evaluate_model(
                self.model, self.val_items, batch_size=64, device=self.device, workers=self.config.workers,
                progress=False, **cached))
        barrier(self.dist)
        return metrics

    def _choose_bridge_weight(self, evaluate) -> dict[str, dict[str, float]]:
        """With a label bridge and ``bridge_weights``, validate each mixing weight and keep the best
        (the model's config holds it, so the bundle saved next uses it); else one evaluation."""
        weights = self.config.bridge_weights if getattr(self.model, "bridge", None) is not None else []
        if not weights:
            return evaluate()
        scored = []
        for weight in weights:
            self.model.config.bridge.weight = float(weight)
            scored.append((evaluate(), float(weight)))
        metrics, weight = max(scored, key=lambda pair: mean_recall(pair[0]))  # the first of equals
        self.model.config.bridge.weight = weight
        log.info("label bridge: weight %.2f chosen on validation (mean recall %.2f)", weight, mean_recall(metrics))
        return metrics

    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in flatten_numbers(record).items():
                if key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def _after_validation(self, metrics: dict | None, rng: dict[str, Any]) -> bool:
        """Log, keep the best bundle, checkpoint; return True when patience has run out."""
        stop = False
        if self.main:
            score = mean_recall(metrics)
            self._log({"step": self.state["step"], "epoch": self.state["epoch"], "val": metrics, "mean_recall": score})
            best = self.state["best"]
            if best is None or score > mean_recall(best):
                self.state.update(best=metrics, best_step=self.state["step"], bad_evals=0)
                save_bundle(bundle_view(self.model), self.output / "best", reference_towers=self.reference_towers,
                            metadata=self._bundle_metadata(metrics))
            else:
                self.state["bad_evals"] += 1
            patience = self.config.patience
            stop = patience is not None and self.state["bad_evals"] >= patience
        self._save_checkpoint(rng)
        return broadcast_flag(stop, self.dist)

    def _bundle_metadata(self, metrics: dict | None) -> dict[str, Any]:
        """What the best bundle records: its step and validation, the start and the gain over it, the
        config; and what the --init model carried that the bundle's weights do not (a logit bias)."""
        metadata = {"step": self.state["step"], "val": metrics, "start": self.state["baseline"],
                    "gain": metric_gain(self.state["baseline"], metrics), "train_config": to_dict(self.config)}
        bias = getattr(self.loss, "logit_bias", None)
        info = self._init_bundle()
        source = (info.manifest.get("metadata") or {}).get("source") if info is not None else None
        if source:  # the pretrained checkpoint the towers came from (and still refer to), for `info`
            metadata["source"] = source
        if isinstance(bias, torch.Tensor) and bias.numel() == 1:
            metadata[LOGIT_BIAS_KEY] = float(bias.detach().float().item())
        elif info is not None and (info.manifest.get("metadata") or {}).get(LOGIT_BIAS_KEY) is not None:
            metadata[LOGIT_BIAS_KEY] = info.manifest["metadata"][LOGIT_BIAS_KEY]
        return metadata

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config, state = self.config, self.state
        started = time.perf_counter() - state["seconds"]
        if state["step"] == 0 and state["baseline"] is None:
            state["baseline"] = self.evaluate()
            if self.main:
                self._log({"step": 0, "epoch": 0, "val": state["baseline"], "mean_recall": mean_recall(state["baseline"]),
                           "baseline": True})
                if config.init and state["baseline"]:
                    # A pretrained start (a pair, a shipped model) is worth keeping: training must beat
                    # it to replace it, so a run that only makes it worse still leaves the start as best.
                    state.update(best=state["baseline"], best_step=0)
                    save_bundle(bundle_view(self.model), self.output / "best", reference_towers=self.reference_towers,
                                metadata=self._bundle_metadata(state["baseline"]))
        loader = self._loader()
        self._set_train_modes()
        stopped_early = False
        boundary_rng = ckpt.rng_state()
        window = {"loss": 0.0, "pairs": 0, "wait": 0.0, "start": time.perf_counter(), "micro": 0}
        bar = progress_bar(total=self.total_steps, desc="train", unit="step", disable=not self.main,
                           initial=state["step"])
        autocast = (lambda: torch.autocast(self.device.type, dtype=self.amp_dtype)) if self.amp_dtype \
            else contextlib.nullcontext
        try:
            while state["step"] < self.total_steps and not stopped_early:
                self.sampler.set_position(state["epoch"], state["batch"])
                waited_from = time.perf_counter()
                for batch in loader:
                    window["wait"] += time.perf_counter() - waited_from
                    with autocast():
                        loss = self.ddp(batch, self.device) / config.grad_accum
                    if not torch.isfinite(loss):
                        raise InputError(f"the loss became {loss.item()} at step {state['step']}; lower the learning "
                                         f"rate or use precision=bf16/fp32")
                    self.scaler.scale(loss).backward()
                    window["loss"] += loss.item()
                    window["pairs"] += len(batch["image_row"]) * self.dist.world_size
                    window["micro"] += 1
                    state["batch"] += 1
                    if window["micro"] % config.grad_accum == 0:
                        self._optimiser_step()
                        state["step"] += 1
                        if state["batch"] >= self.sampler.batches_per_epoch:
                            state["epoch"], state["batch"] = state["epoch"] + 1, 0
                        state["seconds"] = time.perf_counter() - started
                        boundary_rng = ckpt.rng_state()
                        self._report(bar, window)
                        if state["step"] % self.eval_every == 0 or state["step"] == self.total_steps:
                            metrics = self.evaluate()
                            stopped_early = self._after_validation(metrics, boundary_rng)
                            self._set_train_modes()
                        if stopped_early or state["step"] >= self.total_steps:
                            break
                    waited_from = time.perf_counter()
                else:
                    # Micro-batches left over when grad_accum does not divide the epoch roll on.
                    if state["batch"] >= self.sampler.batches_per_epoch:
                        state["epoch"], state["batch"] = state["epoch"] + 1, 0
        except KeyboardInterrupt:
            # Parameters have not moved since the last optimiser step: save exactly that point.
            if window["micro"] % config.grad_accum:
                state["batch"] -= window["micro"] % config.grad_accum
            self._save_checkpoint(boundary_rng)
            bar.close()
            raise TrainingInterrupted(self.output / "checkpoint" if self.main else None, state["step"]) from None
        bar.close()
        result = TrainResult(output=str(self.output), best_bundle=str(self.output / "best") if state["best"] else None,
                             baseline=state["baseline"], best=state["best"], best_step=state["best_step"],
                             steps=state["step"], seconds=round(time.perf_counter() - started, 1),
                             stopped_early=stopped_early, gain=metric_gain(state["baseline"], state["best"]))
        if self.main:
            write_text_atomic(self.output / "summary.json", json.dumps(asdict(result), indent=2))
            from .plot import plot_curves

            plot_curves(self.output / "metrics.jsonl", self.output / "curves.png")
        if self.tensorboard is not None:
            self.tensorboard.close()
        cleanup(self.dist)
        return result

    def _optimiser_step(self) -> None:
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _report(self, bar, window: dict[str, Any]) -> None:
        bar.update(1)
        step = self.state["step"]
        elapsed = time.perf_counter() - window["start"]
        if step % self.config.log_every and step != self.total_steps:
            return
        record = {
            "step": step, "epoch": self.state["epoch"],
            "loss": window["loss"] * self.config.grad_accum / max(1, window["micro"]),
            "lr": self.optimizer.param_groups[-1]["lr"],
            "temperature": 1.0 / self.model.temperature_scale().item(),
            "pairs_per_s": window["pairs"] / max(elapsed, 1e-9),
            "data_wait": window["wait"] / max(elapsed, 1e-9),
        }
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", pairs_s=f"{record['pairs_per_s']:.0f}")
        self._log(record)
        window.update(loss=0.0, pairs=0, wait=0.0, start=time.perf_counter(), micro=0)


def run_training(config: TrainConfig, resume: bool = False) -> TrainResult:
    return Trainer(config, resume=resume).train()
