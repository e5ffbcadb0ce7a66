"""Embedding an index's images on a Ray cluster (`mmretrieve index --engine ray`).

The driver (the process running `mmretrieve index`) scans, plans and writes the index exactly as
a local run does; only the embedding moves. Ray Data streams the paths to embed through a pool of
actors (``map_batches`` with ``ActorPoolStrategy``), each of which loads the model once through
the runtime registry (``load_embedder``: an ONNX export or a bundle), reads and decodes its batch
of files with ``mmretrieve.decode`` and embeds it. Results stream back to the driver as
``ImageBatch``es, which the builder stages and publishes like its own, so the index is the same
format and a killed driver resumes from its staged batches. Ray restarts a killed actor and
retries its batch (Ray Data's actor pools default to ``max_restarts=-1`` and ``max_task_retries=-1``);
a path delivered twice is staged once.

Every worker node reads the files by the paths the driver found them at, so the folder must be on
storage that every node mounts at the same path (NFS, a cloud bucket mounted on each node); a probe
task on each node checks that before anything is embedded. The model's folder must be readable at
the same path too, and mmretrieve installed on every node.

Ray is an optional extra (``pip install "mmretrieve[ray]"``); it is imported only here, when a
run asks for it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..decode import Decoded, decode_one
from ..embedding import ImageBatch
from ..errors import InputError, MMRetrieveError

log = logging.getLogger(__name__)

INSTALL = 'pip install "mmretrieve[ray]"'
MAX_BLOCKS = 4096  # input blocks of paths: about one per batch, at most this many


def import_ray():
    """The ray module, or one sentence saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra installs ray[data]; plain ray lacks its dependencies
    except ImportError:
        raise InputError(f"--engine ray needs Ray, which is not installed; install it with `{INSTALL}`") from None
    return ray


class RayEngine:
    """Embeds images on a Ray cluster; pass it to ``index_images(engine=...)``.

    ``address``: a running cluster (``ray.init(address=...)``, e.g. "ray://head:10001" or "auto");
    None starts a local one with this machine's CPUs (or uses the one this process already joined).
    ``workers``: actors in the pool, each holding one replica of the model (default: as many as the
    cluster has CPUs, or GPUs over ``gpus_per_worker``). ``gpus_per_worker``: GPUs each actor
    reserves (its runtime then runs on CUDA). ``device`` and ``runtime`` are passed to
    ``load_embedder`` on each actor (default: the runtime the driver's embedder uses).
    Use as a context manager; a cluster it started is shut down on exit.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0,
                 cpus_per_worker: float = 1, runtime: str | None = None, device: str | None = None):
        if workers is not None and workers < 1:
            raise InputError(f"--workers must be at least 1 actor with --engine ray, not {workers}")
        if gpus_per_worker < 0 or cpus_per_worker < 0:
            raise InputError("--gpus-per-worker and CPUs per worker cannot be negative")
        self.address, self.workers = address, workers
        self.gpus_per_worker, self.cpus_per_worker = gpus_per_worker, cpus_per_worker
        self.runtime, self.device = runtime, device
        self.started = False  # this engine started (or joined) Ray, so it shuts it down
        self.throughput: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # worker -> [items, busy seconds]

    # -- the cluster --------------------------------------------------------------------------
    def __enter__(self) -> "RayEngine":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self):
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, include_dashboard=False,
                         configure_logging=True, log_to_driver=True)
            except ConnectionError as exc:
                raise InputError(f"could not connect to the Ray cluster at {self.address} ({exc}); check "
                                 f"--ray-address (the head's address, e.g. ray://HOST:10001 or auto)") from None
            self.started = True
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows mmretrieve's own bar
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset run
        return ray

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def pool_size(self) -> int:
        if self.workers is not None:
            return self.workers
        import ray

        resources = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // max(self.cpus_per_worker, 1)))

    # -- what the builder calls ---------------------------------------------------------------
    def check_readable(self, root: str | Path, sample: str | None) -> None:
        """A probe task on every alive node that can hold an actor stats ``root`` and reads
        ``sample`` (a file to embed); one sentence naming the first node that cannot."""
        ray = self.connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        needs = "GPU" if self.gpus_per_worker else "CPU"
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(needs, 0) > 0]
        pending = {n["NodeManagerAddress"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(root), sample)
            for n in nodes}
        for node, ref in pending.items():
            problem = ray.get(ref)
            if problem:
                raise InputError(f"Ray node {node} cannot read {problem}; every node must see the files at the same "
                                 f"path (shared storage such as NFS, or the same bucket mount on each node)")

    def image_batches(self, paths: Sequence[str], embedder, batch_size: int, bar=None) -> Iterator[ImageBatch]:
        """Like ``embedding.embed_image_batches``: every path ends up once in a batch's ``decoded``
        (vectors in the same order) or ``failed``; batches arrive in the order workers finish them."""
        ray = self.connect()
        if not paths:
            yield ImageBatch([], None, [], final=True)
            return
        blocks = max(1, min(math.ceil(len(paths) / batch_size), MAX_BLOCKS))
        dataset = ray.data.from_items([{"path": path} for path in paths], override_num_blocks=blocks)
        embedded = dataset.map_batches(
            EmbedWorker, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.pool_size()),
            fn_constructor_kwargs={"model": getattr(embedder, "path", None) or embedder.ref,
                                   "runtime": self.runtime or getattr(embedder, "runtime", None) or "auto",
                                   "device": self.device, "fingerprint": embedder.fingerprint,
                                   "dim": int(embedder.embed_dim)},
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None)
        seen: set[str] = set()
        for rows in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            batch = self._batch(rows, seen)
            yield batch
            if bar is not None:
                bar.update(len(batch.decoded) + len(batch.failed))
        yield ImageBatch([], None, [], final=True)

    def worker_throughput(self) -> list[dict[str, Any]]:
        """Per actor (node address and process id; a restarted actor is a new one): images
        embedded, seconds spent reading, decoding and embedding them, and images per second."""
        return [{"worker": worker, "items": int(items), "busy_s": round(seconds, 2),
                 "items_per_s": round(items / seconds, 2) if seconds else 0.0}
                for worker, (items, seconds) in sorted(self.throughput.items())]

    def _batch(self, rows: dict[str, np.ndarray], seen: set[str]) -> ImageBatch:
        problems = [str(problem) for problem in rows["problem"] if problem]
        if problems:
            raise InputError(problems[0])
        decoded, failed, keep = [], [], []
        for i, path in enumerate(rows["path"].tolist()):
            stats = self.throughput[str(rows["worker"][i])]
            stats[0] += 1
            stats[1] += float(rows["seconds"][i])
            if path in seen:  # a retried batch whose first result did arrive: staged once
                continue
            seen.add(path)
            error = str(rows["error"][i])
            if error:
                failed.append(Decoded(path, None, sha256=str(rows["sha256"][i]) or None, error=error))
            else:
                keep.append(i)
                decoded.append(Decoded(path, None, int(rows["width"][i]), int(rows["height"][i]),
                                       str(rows["sha256"][i])))
        vectors = np.asarray(rows["vector"][keep], dtype=np.float32) if keep else None
        return ImageBatch(decoded, vectors, failed, final=False)


def _probe(root: str, sample: str | None) -> str | None:
    """On a worker node: what it cannot read (the folder, or a file in it), else None."""
    try:
        os.stat(root)
        if sample is not None:
            with open(sample, "rb") as file:
                file.read(1)
    except OSError as exc:
        return f"{exc.filename or root} ({exc.strerror or exc})"
    return None


class EmbedWorker:
    """One actor of the pool: loads the model once, then reads, decodes and embeds batches of paths."""

    def __init__(self, model: str, runtime: str, device: str | None, fingerprint: str, dim: int):
        import ray

        from ..runtime import load_embedder

        # Ray gives each actor OMP_NUM_THREADS = its CPUs; onnxruntime's pool follows it here.
        os.environ.setdefault("MMRETRIEVE_ORT_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        self.dim = dim
        self.worker = f"{ray.util.get_node_ip_address()} pid {os.getpid()}"
        # A user's error (no model at that path, another model there) goes back as the batches' "problem",
        # which the driver raises: raised here, it would reach the driver only inside Ray's traceback text.
        self.problem: MMRetrieveError | None = None
        try:
            self.embedder = load_embedder(model, runtime, device)
            if self.embedder.fingerprint != fingerprint:
                raise InputError(f"the model at {model} on Ray node {ray.util.get_node_ip_address()} is not the one "
                                 f"the driver loaded (fingerprint {self.embedder.fingerprint[:12]}, not "
                                 f"{fingerprint[:12]}); every node must see the same model folder at the same path")
        except MMRetrieveError as exc:
            self.problem = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        paths = batch["path"].tolist()
        if self.problem is not None:
            images = [Decoded(path, None, error=str(self.problem)) for path in paths]
        else:
            # here, one after another: nothing else runs to overlap with (Ray overlaps the actors)
            images = [decode_one(path, self.embedder.image_preprocessor) for path in paths]
        vectors = np.zeros((len(images), self.dim), dtype=np.float32)
        good = [i for i, image in enumerate(images) if image.error is None]
        if good:
            vectors[good] = self.embedder.embed_pixels(np.stack([images[i].pixels for i in good]))
        seconds = (time.perf_counter() - started) / max(len(images), 1)
        return {
            "path": np.array([image.path for image in images], dtype=object),
            "vector": vectors,
            "width": np.array([image.width or 0 for image in images], dtype=np.int64),
            "height": np.array([image.height or 0 for image in images], dtype=np.int64),
            "sha256": np.array([image.sha256 or "" for image in images], dtype=object),
            "error": np.array([image.error or "" for image in images], dtype=object),
            "worker": np.array([self.worker] * len(images), dtype=object),
            "seconds": np.full(len(images), seconds),
            "problem": np.array([str(self.problem or "")] * len(images), dtype=object),
        }
