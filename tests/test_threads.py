"""The thread policy (mmretrieve.threads): chosen per job, overridable, applied at the entry points."""

from __future__ import annotations

import numpy as np
import pytest

from mmretrieve import threads
from mmretrieve.errors import InputError
from mmretrieve.threads import policy_for


@pytest.fixture(autouse=True)
def no_policy(monkeypatch):
    for name in (threads.THREADS_ENV, threads.SPINNING_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_CURRENT", None)


def test_policy_per_job_on_two_cores():
    search, index, serve, train = (policy_for(job, cores=2) for job in ("search", "index", "serve", "train"))
    assert (search.compute, search.spinning, search.faiss_threads(1), search.faiss_threads(64)) == (2, True, 1, 2)
    assert (index.compute, index.spinning, index.decode_workers) == (2, False, 0)  # decoding in-process
    assert (serve.compute, serve.faiss) == (1, 1)  # one core left for the event loop
    assert train.spinning and train.compute == 2
    assert policy_for("index", cores=8).decode_workers == 7 and policy_for("index", cores=1).decode_workers == 0


def test_user_settings_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    assert policy_for("serve", cores=2).compute == 4 and policy_for("serve", cores=2).explicit
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert policy_for("search", cores=2).compute == 3  # MMRETRIEVE_THREADS before OMP_NUM_THREADS
    assert policy_for("search", cores=2, threads=1).compute == 1  # an argument before both
    monkeypatch.setenv(threads.SPINNING_ENV, "1")
    assert policy_for("search", cores=2).spinning
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(InputError, match="MMRETRIEVE_THREADS must be a whole number"):
        policy_for("search")


def test_library_entry_point_keeps_an_applications_policy():
    chosen = threads.use_policy("index", threads=1)
    assert threads.use_policy("search", keep_existing=True) is chosen
    assert threads.use_policy("search").job == "search"


def test_onnx_sessions_follow_the_policy(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from mmretrieve.runtime.onnx_runtime import THREADS_ENV, session_options

    monkeypatch.delenv(THREADS_ENV, raising=False)
    threads.use_policy("index", threads=3)
    options = session_options(ort)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    threads.use_policy("search", threads=2)
    assert session_options(ort).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options(ort, threads=1).intra_op_num_threads == 1  # an explicit argument wins


def test_each_cli_command_runs_under_its_job():
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    for command, job in (("index", "index"), ("search", "search"), ("eval", "eval"), ("train", "train")):
        threads._CURRENT = None
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert threads.current_policy().job == job


def test_flat_search_uses_one_faiss_thread_for_few_queries(monkeypatch):
    from mmretrieve.index.faiss_lib import faiss
    from mmretrieve.index.flat import FlatIndex

    module = faiss()
    threads.use_policy("search", threads=4)
    index = FlatIndex(8)
    vectors = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    index.add(np.arange(30, dtype=np.int64), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    module.omp_set_num_threads(4)
    calls = []
    real = module.omp_set_num_threads
    monkeypatch.setattr(module, "omp_set_num_threads", lambda n: (calls.append(n), real(n)))
    try:
        index.search(np.eye(1, 8, dtype=np.float32), 3)
        assert calls == [1, 4] and module.omp_get_max_threads() == 4  # one thread, then put back
        calls.clear()
        index.search(np.eye(32, 8, dtype=np.float32), 3)
        assert calls == []  # a batch keeps the policy's threads
    finally:
        real(threads.available_cores())


def test_a_bundle_loaded_after_the_policy_runs_torch_on_the_policys_threads(tiny_model, tmp_path):
    # `mmretrieve eval`/`export` choose the policy before torch is imported; loading the bundle
    # imports torch, which must then follow it (MMRETRIEVE_THREADS=1 means one thread).
    import subprocess
    import sys

    from mmretrieve.bundle import save_bundle

    bundle = save_bundle(tiny_model, tmp_path / "bundle").path
    code = ("import sys\nfrom mmretrieve.threads import use_policy\nuse_policy('eval', threads=1)\n"
            "assert 'torch' not in sys.modules\nfrom mmretrieve.bundle import load_bundle\n"
            f"load_bundle({str(bundle)!r})\nimport torch\nprint(torch.get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"


def test_library_index_runs_take_the_policys_decode_workers(monkeypatch, tmp_path):
    # api.build_index / Index.update: the README's policy table holds for the library too
    # (index_images alone defaults to one worker).
    from mmretrieve import api
    from mmretrieve.index import builder, fused

    seen = []
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(fused, "item_fusion_settings", lambda *args: (None, None, None))
    monkeypatch.setattr(builder, "index_images", lambda *args, **options: seen.append(options["workers"]))
    api._index(tmp_path, tmp_path / "index", None, (), (), None, {})
    api._index(tmp_path, tmp_path / "index", None, (), (), None, {"workers": 2})
    assert seen == [7, 2]


def test_train_runs_torch_on_the_policys_threads(tiny_model, tmp_path):
    # `mmretrieve train` chooses the policy before torch is imported (by the training loop);
    # MMRETRIEVE_THREADS=1 must still mean one torch thread. The loop is a stand-in that, like
    # the real one, imports torch when it is imported, and reports torch's threads.
    import os
    import subprocess
    import sys

    from mmretrieve.bundle import save_bundle

    bundle = save_bundle(tiny_model, tmp_path / "bundle").path
    code = ("import importlib.util, sys\n"
            "def run_training(config, resume=False):\n"
            "    import torch\n"
            "    print('threads', torch.get_num_threads()); raise SystemExit(0)\n"
            "class Loop:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        return importlib.util.spec_from_loader(name, self) if name == 'mmretrieve.train.loop' else None\n"
            "    def create_module(self, spec): return None\n"
            "    def exec_module(self, module):\n"
            "        import torch\n"
            "        module.TrainingInterrupted, module.run_training = KeyboardInterrupt, run_training\n"
            "sys.meta_path.insert(0, Loop())\n"
            "from mmretrieve.cli import cli\n"
            "assert 'torch' not in sys.modules\n"
            f"cli(['train', '--data', {str(tmp_path / 'd.jsonl')!r}, '--init', {str(bundle)!r}, "
            f"'--output', {str(tmp_path / 'out')!r}])\n")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "caption": "a black square"}\n')
    env = {**os.environ, "MMRETRIEVE_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "threads 1" in done.stdout, done.stdout + done.stderr


def test_a_torch_count_set_on_another_thread_is_set_again_for_the_threads_that_start_later():
    # torch keeps its count per thread and as the count of threads started later (and MKL's):
    # after a server worker set 1, the policy's 2 must hold for an embedding thread started now,
    # or its BLAS calls run on other threads than a fresh process's (and round differently).
    import subprocess
    import sys

    code = ("from concurrent.futures import ThreadPoolExecutor\nimport torch\nfrom mmretrieve import threads\n"
            "threads.use_policy('train', threads=2)\n"
            "ThreadPoolExecutor(1).submit(threads.set_torch_threads, 1).result()\n"
            "threads.use_policy('train', threads=2)\n"
            "print(ThreadPoolExecutor(1).submit(torch.get_num_threads).result(), torch.get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "2"]
