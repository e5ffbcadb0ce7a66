"""The library API: the same operations as the CLI, from Python.

    import mmretrieve.api as mm
    index = mm.open_index("index/images")                  # model taken from the index
    for hit in index.search("a dog running on the beach", k=5):
        print(hit.score, hit.path)
    index.update("./photos")                                # add new, re-embed changed, drop vanished
    index.remove(["./photos/old.jpg"])
    index.search_fused("query.jpg", "at night", fusion="mean")  # an image refined by words

    products = mm.build_index("./shop", model="default", captions="titles.csv", fusion="mean")  # photo + title items
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .index.search import Hit, IndexReader
from .threads import use_policy

if TYPE_CHECKING:  # the builder (and multiprocessing) load only when an index is written, not to search
    from .index.builder import IndexReport

INDEX_ROOT_ENV = "MMRETRIEVE_INDEX_ROOT"


def user_path(path: str | Path) -> Path:
    """A path given to the API as a shell would take it: ``~`` expanded, made absolute (links kept)."""
    return Path(path).expanduser().absolute()


def _maybe_path(value: Any) -> Any:
    """A file name (str or Path) through user_path; anything else (a PIL image, None) as it is."""
    return user_path(value) if isinstance(value, (str, Path)) else value


def _model(model: str | Path | None) -> str | None:
    """A model given as a path (``~`` expanded) absolute and resolved; a registered name as it is."""
    from .bundle import resolve_model_ref

    return None if model is None else resolve_model_ref(model)


def default_index_dir(modality: str = "image") -> Path:
    """``index/images`` or ``index/texts`` under $MMRETRIEVE_INDEX_ROOT (default ./index)."""
    return Path(os.environ.get(INDEX_ROOT_ENV, "index")) / ("images" if modality == "image" else "texts")


class Index:
    """An index folder with its model: search it, and keep it in step with a folder."""

    def __init__(self, index_dir: str | Path, model: str | None = None, runtime: str = "auto",
                 device: str | None = None):
        use_policy("search", keep_existing=True)  # threads: unless the application chose a policy already
        self.folder = user_path(index_dir).resolve()
        self.reader = IndexReader(self.folder, model=_model(model), runtime=runtime, device=device)

    def search(self, query: str, k: int = 10, min_score: float | None = None) -> list[Hit]:
        return self.reader.search_text([query], k, min_score)[0]

    def search_image(self, image: str | Path | Any, k: int = 10, min_score: float | None = None) -> list[Hit]:
        return self.reader.search_image([_maybe_path(image)], k, min_score)[0]

    def search_fused(self, image: str | Path | Any, text: str, k: int = 10, fusion: str = "mean",
                     weights: str | Sequence[float] | None = None, fusion_bundle: str | Path | None = None,
                     min_score: float | None = None) -> list[Hit]:
        """An example image refined by words ("like this, but at night") as one fused query."""
        return self.reader.search_fused(_maybe_path(image), text, k, fusion, weights, _maybe_path(fusion_bundle),
                                        min_score)

    def update(self, root: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = (),
               captions: str | Path | None = None, follow_links: bool = False, prune: bool = False,
               **options: Any) -> IndexReport:
        """Bring the index in line with ``root``; a fused index keeps its fusion and captions file.
        ``follow_links``: also follow links leaving ``root``; ``prune``: allow removing more than a
        fifth of the items under ``root`` (an InputError otherwise)."""
        report = _index(root, self.folder, self.reader.embedder, tuple(include), tuple(exclude), captions,
                        {**options, "follow_links": follow_links, "prune": prune})
        self.reader.refresh()
        return report

    def add(self, paths: Sequence[str | Path], captions: str | Path | None = None,
            **options: Any) -> list[IndexReport]:
        reports = [_index(path, self.folder, self.reader.embedder, (), (), captions, dict(options)) for path in paths]
        self.reader.refresh()
        return reports

    def remove(self, paths: Sequence[str | Path]) -> int:
        from .index.builder import remove_files

        removed = remove_files(self.folder, [user_path(path) for path in paths])
        self.reader.refresh()
        return removed

    def __len__(self) -> int:
        return self.reader.store.count()


def open_index(index_dir: str | Path | None = None, model: str | None = None, runtime: str = "auto",
               device: str | None = None) -> Index:
    return Index(index_dir or default_index_dir("image"), model, runtime, device)


def _index(root, folder: Path, embedder, include, exclude, captions, options: dict[str, Any]) -> IndexReport:
    """index_images with the captions file and fusion settings resolved as the CLI does."""
    from .index.builder import index_images
    from .index.fused import item_fusion_settings

    fusion, weights, fusion_bundle = (options.pop(key, None) for key in ("fusion", "weights", "fusion_bundle"))
    captions_map, strategy, source = item_fusion_settings(folder, embedder, _maybe_path(captions), fusion, weights,
                                                          _maybe_path(fusion_bundle))
    engine, ray_options = _engine_options(options)
    if engine == "ray":  # embedded by a pool of actors on a Ray cluster (mmretrieve.index.ray_engine)
        from .index.ray_engine import RayEngine

        with RayEngine(ray_options.get("ray_address"), options.pop("workers", None),
                       ray_options.get("gpus_per_worker", 0)) as ray_engine:
            return index_images(user_path(root), folder, embedder, include, exclude, captions=captions_map,
                                fusion=strategy, captions_source=source, engine=ray_engine, **options)
    if options.get("workers") is None:  # the thread policy's decode processes, as `mmretrieve index` takes them
        from .threads import current_policy, policy_for

        options["workers"] = policy_for("index", cores=current_policy().cores).decode_workers
    return index_images(user_path(root), folder, embedder, include, exclude, captions=captions_map, fusion=strategy,
                        captions_source=source, **options)


def _engine_options(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``engine`` ("local" or "ray") and the Ray options, taken out of ``options``."""
    from .errors import InputError

    engine = options.pop("engine", None) or "local"
    ray_options = {key: options.pop(key) for key in ("ray_address", "gpus_per_worker") if key in options}
    if engine not in ("local", "ray"):
        raise InputError(f"engine must be \"local\" or \"ray\", not {engine!r}")
    if engine == "local" and any(ray_options.values()):
        raise InputError("ray_address and gpus_per_worker apply to engine=\"ray\"")
    return engine, ray_options


def build_index(root: str | Path, model: str, index_dir: str | Path | None = None, runtime: str = "auto",
                device: str | None = None, captions: str | Path | None = None, follow_links: bool = False,
                prune: bool = False, **options: Any) -> Index:
    """Create (or update) an image index for a folder with a model, and open it. With ``captions``
    (a data file) and ``fusion`` (a strategy name; ``weights``, ``fusion_bundle``) each image is
    indexed fused with its first caption. Links inside ``root`` are followed, and with
    ``follow_links`` those leaving it too; ``prune`` allows a run to remove more than a fifth of
    the items under ``root``. ``engine="ray"`` embeds on a Ray cluster (``ray_address``; ``workers``
    encoder actors with ``gpus_per_worker`` GPUs each), whose nodes read ``root`` and the model at the
    same paths. The run's IndexReport is ``index.report`` (``report.workers``: per-worker throughput)."""
    from .index.scan import check_root
    from .runtime import load_embedder

    use_policy("index", keep_existing=True)
    check_root(user_path(root))  # a missing folder fails before a model is loaded
    options.update(follow_links=follow_links, prune=prune)

    folder = user_path(index_dir or default_index_dir("image")).resolve()
    embedder = load_embedder(_model(model), runtime, device)
    report = _index(root, folder, embedder, tuple(options.pop("include", ())), tuple(options.pop("exclude", ())),
                    captions, options)
    index = Index.__new__(Index)
    index.folder = folder
    index.reader = IndexReader(folder, embedder=embedder)
    index.report = report
    return index


def build_text_index(captions_file: str | Path, model: str, index_dir: str | Path | None = None,
                     runtime: str = "auto", device: str | None = None, **options: Any) -> IndexReport:
    from .index.builder import index_texts
    from .runtime import load_embedder

    use_policy("index", keep_existing=True)

    return index_texts(user_path(captions_file), user_path(index_dir or default_index_dir("text")).resolve(),
                       load_embedder(_model(model), runtime, device), **options)
