"""`mmretrieve index --engine ray`: the same index as a local run, built by a pool of Ray actors.

The Ray tests share one local cluster of 2 CPUs (started once for the module) and one tiny model's
export; they are few and small, and marked slow (starting Ray and its actors takes seconds).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_image
from mmretrieve.cli import cli
from mmretrieve.errors import InputError
from mmretrieve.index.builder import index_images
from mmretrieve.index.ray_engine import RayEngine
from mmretrieve.index.store import IndexStore

INSTALL = 'pip install "mmretrieve[ray]"'


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for the module: its address (for a second driver)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_model_config, tmp_path_factory) -> str:
    """The tiny model's ONNX export: actors load it without importing torch, so they start fast."""
    import torch

    from mmretrieve.bundle import save_bundle
    from mmretrieve.export.exporter import export_model
    from mmretrieve.model import build_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ray-model")
    bundle = save_bundle(build_model(tiny_model_config), folder / "bundle").path
    export_model(str(bundle), folder / "export")
    return str(folder / "export")


@pytest.fixture(scope="module")
def embedder(model):
    from mmretrieve.runtime import load_embedder

    return load_embedder(model, "onnx", "cpu")


def photo_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for n in range(count):
        random_image(n, (48, 40)).save(root / f"{n:03d}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = photo_folder(tmp_path_factory.mktemp("ray-photos") / "photos", 24)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


@pytest.fixture(scope="module")
def local_index(photos, embedder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("local") / "index"
    index_images(photos, folder, embedder, batch_size=4, workers=0, progress=False)
    return folder


def vectors_by_path(folder: Path) -> dict[str, np.ndarray]:
    """{path: vector} of an index, checking that no path is held twice."""
    with IndexStore.open(folder, readonly=True) as store:
        ids, vectors = store.all_embeddings()
        items = store.items_by_id(ids)
        paths = [items[int(i)].path for i in ids]
        assert len(set(paths)) == len(paths) == store.count(), "an item is indexed twice"
        return dict(zip(paths, vectors))


def assert_same_vectors(folder: Path, expected: Path) -> None:
    got, want = vectors_by_path(folder), vectors_by_path(expected)
    assert sorted(got) == sorted(want)
    for path, vector in want.items():
        np.testing.assert_allclose(got[path], vector, atol=1e-5, err_msg=path)


class KillingEngine(RayEngine):
    """Kills (SIGKILL) the actor that delivered the first batch, as soon as that batch arrives."""

    killed: tuple[int, int] | None = None  # (pid, images delivered when it was killed)

    def _batch(self, rows, seen):
        batch = super()._batch(rows, seen)
        if self.killed is None:
            pid = int(str(rows["worker"][0]).rsplit("pid ", 1)[1])
            os.kill(pid, signal.SIGKILL)
            self.killed = (pid, len(seen))
        return batch


@pytest.mark.slow
@pytest.mark.onnx
def test_a_ray_built_index_equals_a_local_one(cluster, model, embedder, photos, local_index, tmp_path):
    import mmretrieve.api as mm
    from mmretrieve.index.search import IndexReader

    folder = tmp_path / "index"  # through the library API, as a user would
    report = mm.build_index(photos, model, folder, runtime="onnx", device="cpu", engine="ray", workers=2,
                            batch_size=4, progress=False).report
    assert (report.added, report.total) == (24, 24)
    assert [(f["path"], f["reason"]) for f in report.failed] == [(str(photos / "corrupt.jpg"),
                                                                   "not an image file Pillow can read")]
    assert_same_vectors(folder, local_index)
    with IndexStore.open(folder, readonly=True) as ray_store, IndexStore.open(local_index, readonly=True) as local:
        assert ray_store.known_files() == local.known_files()  # sizes, mtimes, hashes
        assert ray_store.manifest["model"] == local.manifest["model"]
    # Per actor: what it embedded and how fast; every file went through one of them.
    assert len(report.workers) == 2 and sum(w["items"] for w in report.workers) == 25
    assert all(re.fullmatch(r"\S+ pid \d+", w["worker"]) and w["items_per_s"] > 0 for w in report.workers)
    # The same format: searchable, and a later local run finds nothing to do.
    hits = IndexReader(folder, embedder=embedder).search_image([photos / "003.png"], k=1)[0]
    assert hits[0].path == str(photos / "003.png")
    again = index_images(photos, folder, embedder, workers=0, progress=False)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 24)


@pytest.mark.slow
@pytest.mark.onnx
def test_a_killed_actor_is_restarted_and_the_index_is_complete(cluster, embedder, model, tmp_path):
    photos = photo_folder(tmp_path / "photos", 80)
    engine = KillingEngine(workers=2)
    report = index_images(photos, tmp_path / "index", embedder, batch_size=2, progress=False, engine=engine)
    pid, delivered = engine.killed
    assert delivered < 80  # killed mid-run
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (report.added, report.total, report.failed) == (80, 80, [])
    local = index_images(photos, tmp_path / "local", embedder, batch_size=2, workers=0, progress=False)
    assert local.total == 80
    assert_same_vectors(tmp_path / "index", tmp_path / "local")  # all of them, once each


@pytest.mark.slow
@pytest.mark.onnx
def test_a_killed_driver_resumes_from_its_staged_batches(cluster, embedder, model, tmp_path):
    photos = photo_folder(tmp_path / "photos", 120)
    folder = tmp_path / "index"
    command = [sys.executable, "-m", "mmretrieve", "index", str(photos), "--engine", "ray", "--ray-address", cluster,
               "--workers", "2", "--model", model, "--index-dir", str(folder),
               "--batch-size", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staged = threading.Event()

    def watch() -> None:  # the bar advances once a batch is staged
        for line in iter(lambda: driver.stderr.read(200), ""):
            if re.search(r"\| *([1-9]\d*)/120 ", line):
                staged.set()

    threading.Thread(target=watch, daemon=True).start()
    assert staged.wait(240), "the driver staged nothing"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    result = CliRunner().invoke(cli, command[3:])
    assert result.exit_code == 0, result.output
    added, unchanged = map(int, re.search(r"added (\d+), updated 0, removed 0, unchanged (\d+)", result.output).groups())
    assert added + unchanged == 120 and added > 0 and unchanged > 0, result.output  # only the rest was embedded
    assert "120 items" in result.output
    local = index_images(photos, tmp_path / "local", embedder, batch_size=2, workers=0, progress=False)
    assert local.total == 120
    assert_same_vectors(folder, tmp_path / "local")


@pytest.mark.slow
def test_a_root_a_worker_cannot_read_is_refused_in_one_sentence(cluster, tmp_path):
    with pytest.raises(InputError, match=r"^Ray node \S+ cannot read .*missing \(No such file or directory\); every "
                                         r"node must see the files at the same path \(shared storage"):
        RayEngine().check_readable(tmp_path / "missing", None)


def test_without_ray_the_engine_says_what_to_install(monkeypatch, photos_small):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    result = CliRunner().invoke(cli, ["index", str(photos_small), "--engine", "ray", "--model", "nowhere"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == f"Error: --engine ray needs Ray, which is not installed; install it with `{INSTALL}`"


@pytest.mark.parametrize("args, message", [
    (["--ray-address", "auto"], "--ray-address and --gpus-per-worker apply to --engine ray"),
    (["--gpus-per-worker", "1"], "--ray-address and --gpus-per-worker apply to --engine ray"),
])
def test_ray_options_need_the_ray_engine(photos_small, args, message):
    result = CliRunner().invoke(cli, ["index", str(photos_small), *args])
    assert result.exit_code == 2 and message in result.output


def test_the_api_refuses_ray_options_for_the_local_engine(photos_small, tmp_path):
    from mmretrieve.api import _engine_options

    assert _engine_options({"engine": "ray", "ray_address": "auto", "workers": 3}) == ("ray", {"ray_address": "auto"})
    with pytest.raises(InputError, match="apply to engine=\"ray\""):
        _engine_options({"gpus_per_worker": 1})
    with pytest.raises(InputError, match="engine must be \"local\" or \"ray\", not 'dask'"):
        _engine_options({"engine": "dask"})


@pytest.fixture
def photos_small(tmp_path) -> Path:
    return photo_folder(tmp_path / "few", 2)


@pytest.mark.slow
@pytest.mark.onnx
def test_a_worker_that_finds_another_model_is_refused_in_one_sentence(cluster, embedder, photos):
    class Other:  # what the driver loaded differs from the model the workers find at that path
        path, ref, runtime, embed_dim = embedder.path, embedder.ref, "onnx", embedder.embed_dim
        fingerprint = "0" * 64

    with pytest.raises(InputError, match=r"^the model at \S+ on Ray node \S+ is not the one the driver loaded "
                                         r"\(fingerprint \w{12}, not 000000000000\); every node must see the same "
                                         r"model folder at the same path$"):
        list(RayEngine(workers=1).image_batches([str(photos / "000.png")], Other(), 4))
