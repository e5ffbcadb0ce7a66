"""Hook specifications: the only contract between mmretrieve and its plugins.

Every hook receives a ``register`` callback instead of returning values, so the core can
attribute each registration to its plugin, refuse name clashes and keep one table per kind.
Registering only declares metadata; heavy libraries are imported when a thing is first built.
"""

import pluggy

hookspec = pluggy.HookspecMarker("mmretrieve")
hookimpl = pluggy.HookimplMarker("mmretrieve")


@hookspec
def register_encoders(register):
    """Declare text or image encoders.

    Call ``register(EncoderSpec(...))`` once per encoder (see ``mmretrieve.encoders.spec``).
    The spec names a factory as ``"module:attribute"`` so nothing is imported until used.
    """


@hookspec
def register_fusion_strategies(register):
    """Declare fusion strategies that turn several embeddings into one.

    Call ``register(FusionSpec(...))`` once per strategy (see ``mmretrieve.fusion.spec``).
    """


@hookspec
def register_losses(register):
    """Declare contrastive losses for training.

    Call ``register(LossSpec(...))`` once per loss (see ``mmretrieve.registry``).
    """


@hookspec
def register_index_backends(register):
    """Declare vector index backends (exact, HNSW, IVF-PQ, ...).

    Call ``register(IndexBackendSpec(...))`` once per backend.
    """


@hookspec
def register_runtimes(register):
    """Declare inference runtimes (torch, onnxruntime, ...) for index, search and eval.

    Call ``register(RuntimeSpec(...))`` once per runtime.
    """


@hookspec
def register_models(register):
    """Declare named, ready-made model bundles (for example ``default``).

    Call ``register(ModelSpec(name=..., factory="module:function"))``; the factory returns the
    bundle folder and is called only when the model is used.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``mmretrieve`` click group: ``@cli.command() def mine(): ...``."""
