"""Hook specifications: the only contract between mmretrieve and its plugins.

Every hook receives a ``register`` callback instead of returning values, so the core can
attribute each registration to its plugin, refuse name clashes and keep one table per kind.
Registering only declares metadata (the specs in ``mmretrieve.specs``); a spec names its
factory as a callable or as ``"package.module:attribute"``, imported when the thing is first
built, so torch, faiss and onnxruntime stay out of ``mmretrieve --help``.

Each hook below says what its factory is called with and what it must return; the
``...Protocol`` classes spell out the returned objects. They are ``typing.Protocol``s: a plugin
need not inherit from them (the built-in base classes named in each one are the easy way to
satisfy them). docs/plugins.md has a complete example package for every kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

import pluggy

if TYPE_CHECKING:
    import numpy as np

hookspec = pluggy.HookspecMarker("mmretrieve")
hookimpl = pluggy.HookimplMarker("mmretrieve")


# -- what the factories return ---------------------------------------------------------------

@runtime_checkable
class EncoderProtocol(Protocol):
    """A text or image tower (subclass ``mmretrieve.encoders.base.Encoder``, which provides
    ``preprocess``, ``forward``, ``embed`` and ``from_bundle``).

    ``module(**inputs)`` maps the preprocessor's arrays, as tensors, to ``(batch, dim)`` features.
    Saving a model writes ``family`` and the options ``save_architecture`` returns into the
    bundle; loading it calls ``from_bundle(folder, options)`` on the class registered under
    ``family``, then loads the bundle's weights and preprocessing into the result. Hence:

    - ``family`` must be a registered encoder name (usually the encoder's own);
    - ``save_architecture`` returns JSON-able options that this class (or factory) accepts;
    - ``preprocessor`` is a ``mmretrieve.preprocess.TextPreprocessor`` or ``ImagePreprocessor``
      (saved by ``save_architecture`` with ``preprocessor.save(folder)``), which the runtimes read
      without the plugin.

    Saving refuses a tower that breaks these, in one sentence, before any file is written.
    """

    family: ClassVar[str]
    modality: ClassVar[str]  # "text" or "image"
    input_names: ClassVar[tuple[str, ...]]  # the preprocessor's keys, in the module's argument order
    dynamic_axes: ClassVar[dict[str, dict[int, str]]]  # for ONNX export, e.g. {"pixel_values": {0: "batch"}}
    lora_targets: ClassVar[tuple[str, ...]]  # module-name suffixes LoRA adapts
    module: Any  # torch.nn.Module
    preprocessor: Any  # items -> {input name: numpy array}
    dim: int

    def preprocess(self, items: Sequence[Any]) -> dict[str, np.ndarray]: ...

    def forward(self, inputs: dict[str, Any]) -> Any: ...

    def embed(self, items: Sequence[Any], batch_size: int = 32, normalize: bool = True, device: Any = None,
              progress: bool = False) -> np.ndarray: ...

    def layer_groups(self) -> list[list[str]]: ...

    def enable_grad_checkpointing(self) -> None: ...

    def example_inputs(self, batch: int = 2) -> dict[str, np.ndarray]: ...

    def save_architecture(self, folder: Path) -> dict[str, Any]: ...

    @classmethod
    def from_bundle(cls, folder: Path, options: dict[str, Any]) -> EncoderProtocol: ...


@runtime_checkable
class FusionStrategyProtocol(Protocol):
    """Combines the normalised text and image embeddings of the same n things into one vector
    each (numpy in, numpy out; subclassing ``mmretrieve.fusion.strategies.FusionStrategy`` also
    gives ``scores``). A strategy with ``late = True`` follows ``LateFusionProtocol`` instead."""

    name: str
    trainable: bool  # True only for the built-in heads `mmretrieve train-fusion` trains
    late: bool  # False here

    def fuse(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(n, d) text and (n, d) image rows -> (n, d) L2-normalised float32 rows."""


@runtime_checkable
class LateFusionProtocol(Protocol):
    """A strategy with no fused vector (``late = True``): it combines per-modality similarities
    when scoring. An index or a search needs one vector, so there it must also carry ``weights``
    (a (text, image) pair) and is then scored as their weighted sum; `eval --fused` calls ``scores``."""

    name: str
    trainable: bool
    late: bool  # True here

    def scores(self, queries: np.ndarray, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(q, d) queries against n things -> (q, n) float32 similarities."""


@runtime_checkable
class LossProtocol(Protocol):
    """A contrastive loss: a ``torch.nn.Module`` (its parameters train at ``head_lr`` and are
    saved in checkpoints; ``state_dict``/``load_state_dict``/``to`` come with the Module)."""

    def __call__(self, image_features: Any, text_features: Any, logit_scale: Any) -> Any:
        """(b, d) normalised image and text features of b pairs (row i matches row i) and the
        scalar 1/temperature -> a scalar loss tensor. Under torchrun each process sees its own
        batch; gather across processes with ``mmretrieve.train.distributed.gather_features``."""

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...


@runtime_checkable
class IndexBackendProtocol(Protocol):
    """A vector index: L2-normalised float32 vectors under int64 ids, scored by inner product.

    Subclass ``mmretrieve.index.base.VectorIndex``, which checks every input and writes
    ``index.json``: the subclass sets ``kind`` and ``OPTION_DEFAULTS`` and implements ``_add``,
    ``_remove``, ``_search``, ``_save_files``, ``_load_files`` and ``memory_bytes``. Index folders
    are opened with ``load`` on the registered class, so the factory must be that class.
    """

    kind: ClassVar[str]  # the name it is registered under; written into index.json
    dim: int
    options: dict[str, Any]  # JSON-able; recorded in index.json and passed back on load

    def add(self, ids: Any, vectors: Any) -> None: ...

    def remove(self, ids: Any) -> int: ...

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k) float32 scores and int64 ids, best first, padded with -inf / -1."""

    def ids(self) -> np.ndarray: ...

    def memory_bytes(self) -> int: ...

    def save(self, folder: Path) -> None: ...

    @classmethod
    def load(cls, folder: Path, mmap: bool = False) -> IndexBackendProtocol: ...

    def __len__(self) -> int: ...


@runtime_checkable
class EmbedderProtocol(Protocol):
    """What a runtime builds for one model: turns texts and images into its shared space.

    Optional: ``load_fusion_head(folder)`` returns the trained fusion head stored in ``folder``
    run this runtime's way (the onnx runtime runs it in onnxruntime); without it a head runs in
    PyTorch.
    """

    runtime: str  # the runtime's registered name
    ref: str  # the model reference it was given
    path: str  # the folder it loaded (fusion heads stored in the model are found there)
    fingerprint: str  # identity of the weights; an index refuses queries from another model
    embed_dim: int
    image_preprocessor: Any  # a mmretrieve.preprocess.ImagePreprocessor (torch-free)
    text_preprocessor: Any  # a mmretrieve.preprocess.TextPreprocessor (torch-free)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed images -> (n, embed_dim) L2-normalised float32. ``pixels`` is uint8
        (n, size, size, 3) from ``image_preprocessor.resize_crop`` (what the decode pool sends the
        indexer, eval and ``embed``); a runtime normalises them itself (``image_preprocessor.normalize``
        gives the model's float input bit for bit, or its graph does). Normalised float32
        (n, 3, size, size), as ``image_preprocessor.transform`` makes, must still be accepted; an
        ``image_preprocessor`` of the runtime's own with only ``transform`` gets that output.
        Bulk callers (``embedding.embed_image_batches``) call it from a thread of their own, one
        batch at a time, while the caller records the previous batch (a fused index embeds that
        batch's captions with ``embed_texts`` meanwhile): it must not depend on the thread that
        built the embedder, and the two towers may run at the same time."""

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """n texts -> (n, embed_dim) L2-normalised float32."""

    def embed_images(self, images: list) -> np.ndarray:
        """n PIL images or paths -> (n, embed_dim) L2-normalised float32."""


# -- the hooks --------------------------------------------------------------------------------

@hookspec
def register_encoders(register):
    """Declare text or image encoders: ``register(EncoderSpec(name, modality, factory, ...))``.

    Called as ``factory(**{**spec.defaults, **implied, **options})``, where ``implied`` is
    ``{spec.prefix_option: "resnet50"}`` for a name written with one of ``spec.prefixes``
    (``"timm:resnet50"``) and ``options`` come from the model config; returns an
    ``EncoderProtocol``. A prefix, like a name, belongs to one plugin: a second registration of it
    is refused. A factory given as a callable must accept the spec's defaults (checked when it
    registers); an option the factory does not take is refused in one sentence when it is built.
    It need not take ``pretrained``, which is passed (as False) only to factories
    that accept it when a bundle is loaded.
    """


@hookspec
def register_fusion_strategies(register):
    """Declare fusion strategies: ``register(FusionSpec(name, factory, trainable=False))``.

    Called as ``factory(dim=embed_dim, weights=weights)`` (``weights``: None, a "0.3,0.7" string or
    a pair, from ``--weights``); returns a ``FusionStrategyProtocol`` (or, with ``late = True``, a
    ``LateFusionProtocol``). ``--fusion NAME`` picks it in
    ``index``, ``search`` and ``eval --fused``.
    """


@hookspec
def register_losses(register):
    """Declare contrastive losses for training: ``register(LossSpec(name, factory))``.

    Called as ``factory(dist_info=DistInfo, **config.loss_options)`` (``DistInfo``:
    ``mmretrieve.train.distributed``; ``loss_options`` from the train config); returns a
    ``LossProtocol``. Chosen with ``loss = "NAME"`` in the train config (``--set loss=NAME``).
    """


@hookspec
def register_index_backends(register):
    """Declare vector index backends: ``register(IndexBackendSpec(name, factory))``.

    ``factory`` is a ``VectorIndex`` subclass whose ``kind`` is ``name``: new indexes are built as
    ``factory(dim=dim, **options)``, saved folders reopened with ``factory.load(folder, mmap)``.
    Chosen with ``mmretrieve index --index-type NAME``.
    """


@hookspec
def register_runtimes(register):
    """Declare inference runtimes (torch, onnxruntime, ...): ``register(RuntimeSpec(name, factory))``.

    Called as ``factory(model_ref=ref, device=device)``: ``ref`` is a model folder (absolute) or a
    registered model name, ``device`` a string such as "cpu" or "cuda:0", or None for the
    runtime's own choice; returns an ``EmbedderProtocol``. Chosen with ``--runtime NAME`` in
    ``index``, ``search``, ``eval`` and ``serve``.
    """


@hookspec
def register_models(register):
    """Declare named, ready-made model bundles (for example ``default``).

    Call ``register(ModelSpec(name=..., factory="module:function"))``; ``factory()`` takes no
    argument and returns the bundle folder (a ``str`` or ``Path``); it is called only when the
    model is used (``--model NAME``).

    A spec with ``prefixes=("clip:",)`` also answers prefixed references: ``--model clip:REST``
    calls ``factory(REST)`` (REST as typed, e.g. a hub id or ``local-dir:PATH``, whose folder the
    core has made absolute), which returns the bundle folder for it, typically one it builds once
    and caches (``mmretrieve.pairs.pair_bundle``). Index manifests record the prefixed reference,
    so ``factory(REST)`` must find the same model again later. A folder written by transformers'
    ``save_pretrained`` given as ``--model PATH`` is handed to the prefix that its config.json's
    ``model_type`` names (``_`` read as ``-``), as ``factory("local-dir:PATH")``.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``mmretrieve`` click group: ``@cli.command() def mine(): ...``."""
