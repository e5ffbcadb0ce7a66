"""One thread policy for every entry point: how many threads each engine gets, chosen from the
cores this process may use and the job it is doing (docs/benchmarks.md, "Thread policy").

On a small machine the engines fight: onnxruntime's intra-op threads spin-wait after each run,
faiss's OpenMP threads are woken for every query (IndexIDMap2 translates ids in an OpenMP loop)
and image-decoding processes want the same cores. Measured on 2 cores, a warm text query took
9.7 ms with every engine at its own default and 3.5 ms with faiss on one thread.

    job       onnxruntime intra-op     spinning  faiss          torch    decode workers
    search    cores                    on        1 below 20 queries, else cores   cores    -
    index     cores                    off       cores          cores    0 up to 2 cores, else cores - 1
    serve     cores - 1                off       cores - 1      cores-1  -
    other     cores                    on        cores          cores    as given

faiss's threads are for builds and batches of queries; in every job fewer than 20 queries on the
flat index take one (``faiss_threads``; hnsw and ivfpq measured no gain and keep faiss's own).

Overrides, strongest first: an explicit argument (``--threads``, ``threads=``), then
``MMRETRIEVE_THREADS`` (threads for every engine), then ``OMP_NUM_THREADS`` (likewise; torch and
faiss read it themselves too); ``MMRETRIEVE_ORT_THREADS`` still sets onnxruntime's alone and
``MMRETRIEVE_ORT_SPINNING=1``/``0`` its spinning.

Decode workers for ``index``: on 2 cores, decoding in the embedding process (0 workers: the
indexing thread decodes while ``embedding.embed_image_batches``' own thread embeds the batch
before) indexed faster than worker processes (interleaved ``benchmarks/index_throughput.py
--workers 0,ahead,serial,before,1`` on 1,000 images: 81.0% of encoder-only with 0 workers, 74.7%
with 1 process; docs/benchmarks.md "Issue 17, fourth window"): onnxruntime already uses both cores,
and a process only adds hand-over. Above 2 cores (not measured here) cores - 1 workers keep the
decoding off the embedding process.

``use_policy(job)`` is called by each entry point (CLI commands, ``mmretrieve.api``, the server);
the runtimes and the flat index read ``current_policy()`` when they create sessions or search.
Nothing here imports torch, faiss or onnxruntime.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .errors import InputError

THREADS_ENV = "MMRETRIEVE_THREADS"
SPINNING_ENV = "MMRETRIEVE_ORT_SPINNING"
JOBS = ("search", "index", "serve", "train", "eval", "embed", "export")
# Below this many queries faiss's flat search runs one query per OpenMP thread (its BLAS
# threshold is 20), so extra threads only add the cost of waking them (IndexIDMap2's id loop).
FAISS_SMALL_BATCH = 20


@dataclass(frozen=True)
class ThreadPolicy:
    job: str  # what the process is doing: one of JOBS
    cores: int  # cores this process may run on (its CPU affinity)
    compute: int  # onnxruntime intra-op threads and torch threads
    spinning: bool  # onnxruntime's intra-op threads spin-wait between runs (fast for long bulk runs only)
    faiss: int  # faiss OpenMP threads for a batch of queries or an index build
    decode_workers: int  # image-decoding processes when a command is not given --workers
    explicit: bool = False  # the thread count came from the user (argument or environment)

    def faiss_threads(self, n_queries: int) -> int:
        """faiss threads for a search of ``n_queries``: one for a few queries, else the policy's."""
        return 1 if n_queries < FAISS_SMALL_BATCH else self.faiss


def available_cores() -> int:
    """Cores this process may use (its affinity mask, so a container's or taskset's limit counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _whole_number(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise InputError(f"{name} must be a whole number of threads of at least 1, not {value!r}; "
                         f"unset it to let mmretrieve choose")
    return number


def _user_threads(env) -> int | None:
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value:
            # OMP_NUM_THREADS may be a list for nested levels ("4,2"); its first level is ours.
            return _whole_number(name, value.split(",")[0].strip() if name == "OMP_NUM_THREADS" else value)
    return None


def policy_for(job: str, cores: int | None = None, threads: int | None = None, env=None) -> ThreadPolicy:
    """The policy for ``job`` on ``cores`` (default: this process's); ``threads`` or the
    environment (MMRETRIEVE_THREADS, then OMP_NUM_THREADS) set the compute threads instead."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; one of {JOBS}")
    env = os.environ if env is None else env
    cores = cores or available_cores()
    chosen = threads if threads is not None else _user_threads(env)
    if chosen is not None and chosen < 1:
        raise InputError(f"threads must be at least 1, not {chosen}")
    if job == "serve":  # the event loop, uploads and thumbnails keep one core (docs/serving.md)
        compute = max(1, cores - 1)
    else:
        compute = cores
    compute = chosen or compute
    # search spins: with faiss on one thread for a few queries nothing else wants the cores between
    # runs, and a warm query took 3.49 ms spinning against 4.25 ms not (benchmarks/
    # warm_search_processes.py; docs/benchmarks.md, "Issue 17 re-measured, second quiet window");
    # index decodes between runs and serve answers many clients, so they do not.
    spinning = job not in ("index", "serve")
    spin = env.get(SPINNING_ENV, "").strip()
    if spin:
        if spin not in ("0", "1"):
            raise InputError(f"{SPINNING_ENV} must be 0 or 1, not {spin!r}")
        spinning = spin == "1"
    decode_workers = (0 if cores <= 2 else cores - 1) if job == "index" else 0  # measured: module docstring
    return ThreadPolicy(job=job, cores=cores, compute=compute, spinning=spinning, faiss=compute,
                        decode_workers=decode_workers, explicit=chosen is not None)


_CURRENT: ThreadPolicy | None = None


def current_policy() -> ThreadPolicy:
    """The policy an entry point chose; a library caller that chose none gets the search policy."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = policy_for("search")
    return _CURRENT


def use_policy(job: str, threads: int | None = None, keep_existing: bool = False) -> ThreadPolicy:
    """Make ``job``'s policy the process's and apply it to the engines already imported.

    ``keep_existing``: a library entry point (``mmretrieve.api``) leaves a policy that an
    application or the CLI already chose as it is.
    """
    global _CURRENT
    if keep_existing and _CURRENT is not None and threads is None:
        return _CURRENT
    _CURRENT = policy_for(job, threads=threads)
    apply_to_torch()
    return _CURRENT


def apply_to_torch() -> None:
    """torch's intra-op threads set to the policy's, if torch is imported (torch reads it once
    per thread pool; its default is already one per core, so only a smaller count changes it)."""
    torch = sys.modules.get("torch")
    if torch is None or _CURRENT is None:
        return
    if torch.get_num_threads() != _CURRENT.compute or _TORCH_SET not in (None, _CURRENT.compute):
        set_torch_threads(_CURRENT.compute)


_TORCH_SET: int | None = None  # the count last given to torch through set_torch_threads


def set_torch_threads(count: int) -> None:
    """``torch.set_num_threads(count)``, remembered. torch keeps the count per thread (OpenMP) and
    also as the count of threads that start later and of MKL, so a count set on another thread
    (the server's worker) differs from this thread's while every new thread (an embedding
    thread) and MKL take it: apply_to_torch sets it again whenever the two can differ."""
    global _TORCH_SET
    sys.modules["torch"].set_num_threads(count)
    _TORCH_SET = count
