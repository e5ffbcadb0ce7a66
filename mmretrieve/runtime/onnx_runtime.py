"""The onnx runtime: an ONNX export folder in onnxruntime, on TensorRT or CUDA when present.

Only onnxruntime, tokenizers, NumPy and Pillow are imported here, never torch: a search
process that embeds its queries with this runtime starts without PyTorch.

Session settings come from keyword arguments, else MMRETRIEVE_ORT_THREADS (intra-op threads)
and MMRETRIEVE_ORT_OPTIMIZATION (disable, basic, extended or all; default all), else the
process's thread policy (mmretrieve.threads: intra-op threads and whether they spin-wait).
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import MANIFEST as BUNDLE_MANIFEST
from ..errors import ExportError, InputError
from ..export.manifest import input_dtype, read_export_info
from ..preprocess import ImagePreprocessor, TextPreprocessor
from .ort import import_onnxruntime

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
THREADS_ENV = "MMRETRIEVE_ORT_THREADS"
OPTIMIZATION_ENV = "MMRETRIEVE_ORT_OPTIMIZATION"
CHUNK = 256  # rows per session.run: bounds memory for long lists
# Texts per run once a batch is sorted by length: 44% of a batch of 32 Flickr8k captions was
# padding; runs of 8 similar lengths embedded 1.2x more captions/s (onnxruntime's per-run cost is small).
TEXT_SUB_BATCH = 8
# Images per run on CPU: a batch of 32 224 px images overflows the caches between layers. On 2
# quiet cores runs of 4 embedded 1.31x the images/s of one run, runs of 8 1.17x and of 16 1.14x
# (benchmarks/ort_towers.py, docs/benchmarks.md "Images in runs"). A GPU keeps the batch whole.
IMAGE_SUB_BATCH = 4


def gpu_visible() -> bool:
    """Whether the CUDA driver sees a device (honouring CUDA_VISIBLE_DEVICES), asked without torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def choose_providers(ort, device: str | None, gpu_check=gpu_visible) -> list[tuple[str, dict[str, Any]]]:
    """TensorRT, then CUDA, then CPU: those this onnxruntime build has, GPU ones only with a GPU
    visible; device "cpu" forces CPU and "cuda[:N]" insists on a GPU."""
    device = (device or "auto").lower()
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise InputError(f"the onnx runtime runs on cpu or cuda[:N], not {device!r}")
    if device == "cpu":
        return [("CPUExecutionProvider", {})]
    gpu_options = {"device_id": int(device.split(":", 1)[1])} if ":" in device else {}
    installed = [name for name in GPU_PROVIDERS if name in ort.get_available_providers()]
    if device.startswith("cuda") and not installed:
        raise InputError(f"device {device} asked for, but this onnxruntime has no CUDA provider; "
                         f"install onnxruntime-gpu (`pip install mmretrieve[gpu]`)")
    if installed and not gpu_check():
        if device.startswith("cuda"):
            raise InputError(f"device {device} asked for, but no CUDA device is visible")
        log.warning("onnxruntime can use %s, but no GPU is visible; running on CPU", " and ".join(installed))
        installed = []
    return [(name, dict(gpu_options)) for name in installed] + [("CPUExecutionProvider", {})]


def session_options(ort, threads: int | None = None, optimization: str | None = None, policy=None):
    from ..threads import current_policy

    policy = policy or current_policy()
    options = ort.SessionOptions()
    threads = threads if threads is not None else os.environ.get(THREADS_ENV)
    if threads in (None, ""):
        threads = policy.compute
    try:
        options.intra_op_num_threads = int(threads)
    except ValueError:
        raise InputError(f"{THREADS_ENV} must be a whole number of threads, not {threads!r}") from None
    # Spinning threads answer the next op sooner but burn a core after each run, which an
    # interactive query's faiss search or the decode workers then wait for (mmretrieve.threads).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if policy.spinning else "0")
    level = (optimization or os.environ.get(OPTIMIZATION_ENV) or "all").lower()
    if level not in OPTIMIZATION_LEVELS:
        raise InputError(f"the onnx graph optimisation level must be one of {OPTIMIZATION_LEVELS}, not {level!r}")
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return options


class OnnxEmbedder:
    """The Embedder interface (see mmretrieve.runtime) over an export's two graphs.

    Each tower's session is created on first use, so a text search never loads the image graph.
    """

    def __init__(self, model_ref: str | Path, device: str | None = None, threads: int | None = None,
                 optimization: str | None = None, text_sub_batch: int | None = TEXT_SUB_BATCH,
                 image_sub_batch: int | None = IMAGE_SUB_BATCH):
        folder = Path(model_ref)
        if (folder / BUNDLE_MANIFEST).is_file():
            raise ExportError(f"{folder} is a model bundle, not an ONNX export; run `mmretrieve export --model "
                              f"{folder} --out EXPORT_DIR` and use EXPORT_DIR as the model (or --runtime torch)")
        self.info = read_export_info(folder)
        self.runtime = "onnx"
        self._ort = import_onnxruntime()
        self.ref = str(model_ref)
        self.path = str(folder.resolve())
        self.fingerprint = self.info.fingerprint
        self.embed_dim = self.info.embed_dim
        self.precision = self.info.precision
        self.text_preprocessor = TextPreprocessor.load(folder / "text")
        self.image_preprocessor = ImagePreprocessor.load(folder / "image")
        self._providers = choose_providers(self._ort, device)
        self._options = session_options(self._ort, threads, optimization)
        self._sessions: dict[str, Any] = {}
        for name, value in (("text_sub_batch", text_sub_batch), ("image_sub_batch", image_sub_batch)):
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1 (or None), not {value}")
        self.text_sub_batch = text_sub_batch  # None: run each batch as given, padded to its longest text
        self.image_sub_batch = image_sub_batch  # None: run each batch (up to CHUNK) as given

    @property
    def providers(self) -> list[str]:
        """The providers the sessions created so far actually run on."""
        active = [p for s in self._sessions.values() for p in s.get_providers()]
        return list(dict.fromkeys(active)) or [name for name, _ in self._providers]

    def session(self, tower: str):
        if tower not in self._sessions:
            self._sessions[tower] = self.create_session(Path(self.path) / self.info.graph(tower)["file"])
        return self._sessions[tower]

    def create_session(self, path: Path):
        """A session on the first provider in line that starts; CPU is last and always there (also
        used for the export's fusion heads, so they run where the towers run)."""
        def create(providers):
            # enable_fallback=0: onnxruntime's own fallback prints to stdout, which carries results
            return self._ort.InferenceSession(str(path), self._options, providers=[name for name, _ in providers],
                                              provider_options=[options for _, options in providers],
                                              enable_fallback=0)

        wanted = [name for name, _ in self._providers if name in GPU_PROVIDERS]
        failures = []
        for start in range(len(self._providers)):
            providers = self._providers[start:]
            try:
                session = create(providers)
                break
            except Exception as exc:  # noqa: BLE001 - whatever a GPU provider fails with, the next one is tried
                if len(providers) == 1:
                    raise
                failures.append(f"{providers[0][0]}: {str(exc).strip().splitlines()[0][:160]}")
        self._providers = providers  # the next tower's session skips what failed here
        if wanted and not set(wanted) & set(session.get_providers()):
            log.warning("onnxruntime is running on CPU: %s",
                        "; ".join(failures) or f"{' and '.join(wanted)} did not start")
            self._providers = [("CPUExecutionProvider", {})]
        return session

    def load_fusion_head(self, folder: str | Path):
        """The trained fusion head in ``folder`` (a fusion bundle) as a strategy run by onnxruntime on
        this embedder's providers; a head trained on another model is refused."""
        from .onnx_fusion import OnnxFusion

        return OnnxFusion(folder, self.fingerprint, self.create_session)

    def _run(self, tower: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        graph = self.info.graph(tower)
        output = self.session(tower).run([graph["output"]], {name: feeds[name] for name in graph["inputs"]})[0]
        return output.astype(np.float32, copy=False)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, h, w, 3) from ``resize_crop`` (or normalised float32 (n, 3, h, w)) -> rows. An
        export that takes uint8 (format 2) normalises inside its graph; an older one, that takes
        float32, is fed ``ImagePreprocessor.normalize``'s output, bit for bit what it was fed before."""
        name = self.info.graph("image")["inputs"][0]
        pixels = self._image_input(np.asarray(pixels))
        on_cpu = self.session("image").get_providers()[0] == "CPUExecutionProvider"
        step = min(CHUNK, self.image_sub_batch) if self.image_sub_batch and on_cpu else CHUNK
        return self._rows([self._run("image", {name: pixels[start:start + step]})
                           for start in range(0, len(pixels), step)])

    def _image_input(self, pixels: np.ndarray) -> np.ndarray:
        takes_uint8 = input_dtype(self.info.graph("image")) == "uint8"
        if pixels.dtype == np.uint8:
            return np.ascontiguousarray(pixels) if takes_uint8 else self.image_preprocessor.normalize(pixels)
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        # normalised floats back to the bytes they were made from (exact for the preprocessor's)
        return self.image_preprocessor.to_uint8(pixels) if takes_uint8 else pixels

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._rows([self._embed_text_chunk(texts[start:start + CHUNK]) for start in range(0, len(texts), CHUNK)])

    def _embed_text_chunk(self, texts: list[str]) -> np.ndarray:
        from . import embed_by_length

        feeds = self.text_preprocessor(texts)
        if not self.text_sub_batch or len(texts) <= self.text_sub_batch:
            return self._run("text", feeds)
        return embed_by_length(feeds, lambda part: self._run("text", part), self.embed_dim, self.text_sub_batch)

    def embed_images(self, images: list) -> np.ndarray:
        if not images:
            return self._rows([])
        return self.embed_pixels(self.image_preprocessor.uint8_batch(images))

    def _rows(self, chunks: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embed_dim), dtype=np.float32)
