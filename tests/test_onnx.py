"""ONNX export and the onnx runtime on the tiny random model: parity gate (and a broken export it
catches), int8/fp16 with the recall gate, index built with torch and searched with onnx, a
search process without torch, the `export` command and its one-sentence errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_image
from tiny_models import make_colour_dataset

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.onnx, pytest.mark.slow]

import onnx  # noqa: E402
import torch  # noqa: E402

from mmretrieve.bundle import read_bundle_info, save_bundle  # noqa: E402
from mmretrieve.cli import cli  # noqa: E402
from mmretrieve.errors import InputError, MMRetrieveError  # noqa: E402
from mmretrieve.export import ExportError, ParityError, read_export_info  # noqa: E402
from mmretrieve.export.exporter import export_model  # noqa: E402
from mmretrieve.index.builder import index_images  # noqa: E402
from mmretrieve.index.search import IndexReader  # noqa: E402
from mmretrieve.metrics import PARITY_MIN_COSINE  # noqa: E402
from mmretrieve.model import build_model  # noqa: E402
from mmretrieve.runtime import choose_runtime, load_embedder  # noqa: E402
from mmretrieve.runtime.onnx_runtime import OnnxEmbedder, choose_providers  # noqa: E402
from mmretrieve.runtime.torch_runtime import TorchEmbedder  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_model_config, tmp_path_factory):
    torch.manual_seed(0)
    return save_bundle(build_model(tiny_model_config), tmp_path_factory.mktemp("onnx") / "bundle").path


@pytest.fixture(scope="module")
def exported(bundle):
    export_model(str(bundle), bundle.parent / "export")
    return bundle.parent / "export"


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), per_colour=4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for seed, size in enumerate([(80, 60), (60, 80), (120, 120), (300, 40), (64, 64), (90, 70)]):
        random_image(seed, size).save(root / f"photo{seed}.png")
    return root


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_export_is_a_checked_graph_per_tower_with_the_bundles_fingerprint(bundle, exported):
    info = read_export_info(exported)
    assert info.fingerprint == read_bundle_info(bundle).fingerprint
    assert info.precision == "fp32" and info.embed_dim == 16 and info.manifest["opset"] >= 17
    assert {"text/tokenizer.json", "text/text_preprocess.json", "image/image_preprocess.json",
            "text.onnx", "image.onnx"} <= set(info.manifest["files"])
    for tower, inputs, output in (("text", ["input_ids", "attention_mask"], "text_embedding"),
                                  ("image", ["pixels"], "image_embedding")):
        graph = onnx.load(str(exported / f"{tower}.onnx"))
        onnx.checker.check_model(graph, full_check=True)
        assert [i.name for i in graph.graph.input] == inputs
        assert [o.name for o in graph.graph.output] == [output]
        batch_dims = {i.type.tensor_type.shape.dim[0].dim_param for i in graph.graph.input}
        assert batch_dims == {"batch"}  # dynamic batch, not the example's 2
        report = info.manifest["parity"][tower]
        assert report["min_cosine"] >= PARITY_MIN_COSINE
        assert report["batch_sizes"][0] == 1 and report["batch_sizes"][-1] > 1
    text_dims = [d.dim_param for d in onnx.load(str(exported / "text.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert text_dims == ["batch", "sequence"]
    # the image graph takes bytes (n, h, w, 3) and normalises them itself; the manifest says so
    image_input = onnx.load(str(exported / "image.onnx")).graph.input[0].type.tensor_type
    assert image_input.elem_type == onnx.TensorProto.UINT8
    size = OnnxEmbedder(exported).image_preprocessor.config.size
    assert [d.dim_value for d in image_input.shape.dim][1:] == [size, size, 3]
    assert info.manifest["format_version"] == 2
    assert info.graph("image")["input_dtype"] == "uint8" and info.graph("image")["input_layout"] == "NHWC"


@pytest.fixture(scope="module")
def float_export(bundle, tmp_path_factory):
    """An export written the way format 1 wrote it: the image graph takes normalised float32 NCHW."""
    from mmretrieve.export import exporter, manifest

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(manifest.TOWER_GRAPHS, "image", dict(manifest.FLOAT_IMAGE_GRAPH))
        patch.setattr(exporter, "FORMAT_VERSION", 1)
        out = tmp_path_factory.mktemp("float-export") / "export"
        export_model(str(bundle), out)
    return out


def test_uint8_graph_sees_exactly_the_float_input_and_old_float_exports_still_work(bundle, exported, float_export,
                                                                                    photos, tmp_path):
    old = OnnxEmbedder(float_export, device="cpu")
    assert read_export_info(float_export).manifest["format_version"] == 1 and "input_dtype" not in old.info.graph("image")
    graph = onnx.load(str(float_export / "image.onnx")).graph.input[0]
    assert graph.name == "pixel_values" and graph.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    new = OnnxEmbedder(exported, device="cpu")
    images = [random_image(seed, size) for seed, size in enumerate([(80, 60), (33, 90), (300, 40), (32, 32)])]
    uint8 = new.image_preprocessor.uint8_batch(images)
    floats = new.image_preprocessor(images)["pixel_values"]
    size = new.image_preprocessor.config.size
    assert uint8.dtype == np.uint8 and uint8.shape == (4, size, size, 3)
    # the graph's lookup gives the tower the very floats the numpy step gives: same rows as the old graph
    by_new, by_old = new.embed_pixels(uint8), old.embed_pixels(uint8)
    assert np.abs(by_new - by_old).max() < 1e-6
    # each export takes either input: float32 is mapped back to its exact bytes, uint8 normalised in numpy
    assert np.array_equal(new.embed_pixels(floats), by_new) and np.array_equal(old.embed_pixels(floats), by_old)
    reference = TorchEmbedder(str(bundle), device="cpu")
    assert np.array_equal(reference.embed_pixels(uint8), reference.embed_pixels(floats))
    assert (by_new * reference.embed_pixels(uint8)).sum(axis=1).min() >= PARITY_MIN_COSINE
    # an index built with the old export searches the same through either export
    index_images(photos, tmp_path / "idx", old, workers=1, progress=False)
    query = [photos / "photo3.png", photos / "photo1.png"]
    by_old_hits = IndexReader(tmp_path / "idx", model=str(float_export), runtime="onnx").search_image(query, k=3)
    by_new_hits = IndexReader(tmp_path / "idx", model=str(exported), runtime="onnx").search_image(query, k=3)
    for old_hits, new_hits in zip(by_old_hits, by_new_hits):
        assert [h.path for h in old_hits] == [h.path for h in new_hits]
        assert np.allclose([h.score for h in old_hits], [h.score for h in new_hits], atol=1e-5)
    assert by_old_hits[0][0].path == str(query[0]) and by_old_hits[0][0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("break_it", ["rotate", "unnormalise"])
def test_parity_gate_refuses_a_graph_that_differs_from_torch(bundle, tmp_path, monkeypatch, break_it):
    from mmretrieve.export import graph

    real_forward = graph.EmbeddingGraph.forward

    def broken(self, *inputs):  # what an exporter bug would do: the traced graph computes something else
        out = real_forward(self, *inputs)
        if self.tower != "text":
            return out
        return torch.nn.functional.normalize(out + out.roll(1, dims=-1), dim=-1) if break_it == "rotate" else 2 * out

    monkeypatch.setattr(graph.EmbeddingGraph, "forward", broken)
    with pytest.raises(ParityError, match="exported text tower disagrees with PyTorch: minimum cosine") as caught:
        export_model(str(bundle), tmp_path / "export")
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left behind


def test_int8_export_reports_recall_of_both_variants(bundle, exported, colours, tmp_path):
    # forced: the random tiny model's recall is near chance, so int8 moves it by whole queries
    manifest = export_model(str(bundle), tmp_path / "int8", precision="int8", eval_data=colours, force=True)
    assert read_export_info(tmp_path / "int8").precision == "int8"
    results = manifest["recall"]["results"]
    assert set(results) == {"fp32", "int8"} and set(results["int8"]) == {"t2i", "i2t"}
    assert set(results["int8"]["t2i"]) == {"R@1", "R@5", "R@10", "median_rank"}
    assert manifest["agreement"]["text"]["min_cosine"] > 0.9  # measured, not gated
    assert manifest["int8_settings"]["per_channel"] is True
    graph = onnx.load(str(tmp_path / "int8" / "text.onnx"))
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.graph.node)
    # int8 slowed the image tower down (its one MatMul is the head), so it stays the fp32 graph
    assert (tmp_path / "int8" / "image.onnx").read_bytes() == (exported / "image.onnx").read_bytes()
    embedder = OnnxEmbedder(tmp_path / "int8")
    assert embedder.fingerprint == read_bundle_info(bundle).fingerprint
    vectors = embedder.embed_texts(["a red dog", "a blue car"])
    assert vectors.shape == (2, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)


def test_recall_gate_refuses_a_drop_unless_forced(bundle, colours, tmp_path, monkeypatch):
    from mmretrieve.export import exporter

    def fake_recall(folder, items, progress=False):
        r5 = 80.0 if folder.name == "fp32" else 77.5
        return {direction: {"R@1": 50.0, "R@5": r5, "R@10": 90.0, "median_rank": 2.0} for direction in ("t2i", "i2t")}

    monkeypatch.setattr(exporter, "recall_report", fake_recall)
    with pytest.raises(ExportError, match=r"int8 export loses 2.50 points of t2i R@5 \(80.00 -> 77.50"):
        export_model(str(bundle), tmp_path / "refused", precision="int8", eval_data=colours)
    assert not (tmp_path / "refused").exists()
    manifest = export_model(str(bundle), tmp_path / "forced", precision="int8", eval_data=colours, force=True)
    assert manifest["recall"]["results"]["int8"]["t2i"]["R@5"] == 77.5


def test_recall_gate_checks_every_recall_at_k():
    from mmretrieve.export.recall import require_recall

    fp32 = {d: {"R@1": 30.0, "R@5": 60.0, "R@10": 70.0} for d in ("t2i", "i2t")}
    lost_r10 = {"t2i": dict(fp32["t2i"]), "i2t": {"R@1": 30.4, "R@5": 60.0, "R@10": 67.8}}  # R@5 holds
    with pytest.raises(ExportError, match=r"loses 2.20 points of i2t R@10 \(70.00 -> 67.80; at most 1.0 allowed "
                                          r"on each of R@1, R@5, R@10\)"):
        require_recall(fp32, lost_r10, "int8", force=False)
    lost_r1 = {"t2i": {"R@1": 28.5, "R@5": 60.5, "R@10": 70.0}, "i2t": dict(fp32["i2t"])}
    with pytest.raises(ExportError, match="loses 1.50 points of t2i R@1"):
        require_recall(fp32, lost_r1, "int8", force=False)
    require_recall(fp32, lost_r10, "int8", force=True)  # --force keeps it
    require_recall(fp32, {d: {k: v - 1.0 for k, v in r.items()} for d, r in fp32.items()}, "int8", force=False)


def test_fp16_export_runs_on_cpu_and_reports_its_agreement(bundle, tmp_path):
    manifest = export_model(str(bundle), tmp_path / "fp16", precision="fp16", force=True)
    assert manifest["precision"] == "fp16" and "recall" not in manifest
    assert manifest["agreement"]["image"]["min_cosine"] > 0.99
    graph = onnx.load(str(tmp_path / "fp16" / "image.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # bytes in, as in fp32
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 out
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)


def test_reduced_precision_without_eval_data_needs_force(bundle, tmp_path):
    with pytest.raises(ExportError, match="give --eval-data FILE .* or --force"):
        export_model(str(bundle), tmp_path / "int8", precision="int8")


def test_index_built_with_torch_searches_the_same_with_onnx(bundle, exported, photos, tmp_path):
    torch_embedder = TorchEmbedder(str(bundle), device="cpu")
    index_images(photos, tmp_path / "idx", torch_embedder, workers=0, progress=False)
    onnx_embedder = load_embedder(str(exported), "auto")
    assert isinstance(onnx_embedder, OnnxEmbedder) and onnx_embedder.fingerprint == torch_embedder.fingerprint
    by_torch = IndexReader(tmp_path / "idx", embedder=torch_embedder)
    by_onnx = IndexReader(tmp_path / "idx", model=str(exported), runtime="onnx")
    queries = ["a red dog on the beach", "two cats", "a man riding a bike near the water"]
    for torch_hits, onnx_hits in zip(by_torch.search_text(queries, k=3), by_onnx.search_text(queries, k=3)):
        assert [h.path for h in torch_hits] == [h.path for h in onnx_hits]
        assert np.allclose([h.score for h in torch_hits], [h.score for h in onnx_hits], atol=1e-4)
    query = photos / "photo2.png"
    top = by_onnx.search_image([query], k=1)[0][0]
    assert top.path == str(query) and top.score == pytest.approx(1.0, abs=1e-4)


def test_length_sorted_sub_batches_give_the_same_embeddings(exported):
    texts = [" ".join(["a red dog"] * n) for n in (1, 9, 2, 7, 3, 1, 10, 4, 2, 8, 5, 6)] + ["cat"] * 9
    sorted_runs = OnnxEmbedder(exported, device="cpu", text_sub_batch=4).embed_texts(texts)
    one_run = OnnxEmbedder(exported, device="cpu", text_sub_batch=None).embed_texts(texts)
    assert np.abs(sorted_runs - one_run).max() < 1e-5


def test_images_run_in_runs_of_the_sub_batch_on_cpu_with_the_same_rows(exported):
    pixels = np.random.default_rng(0).integers(0, 256, (19, 64, 64, 3), dtype=np.uint8)
    runs = OnnxEmbedder(exported, device="cpu", image_sub_batch=8)
    sizes = []
    session = runs.session("image")
    runs._sessions["image"] = type("Counting", (), {
        "get_providers": session.get_providers,
        "run": lambda self, names, feeds: sizes.append(len(next(iter(feeds.values())))) or session.run(names, feeds)})()
    in_runs = runs.embed_pixels(pixels)
    assert sizes == [8, 8, 3]
    whole = OnnxEmbedder(exported, device="cpu", image_sub_batch=None).embed_pixels(pixels)
    assert in_runs.shape == whole.shape and np.abs(in_runs - whole).max() < 1e-5
    # on a GPU provider the batch stays one run
    on_gpu = OnnxEmbedder(exported, device="cpu", image_sub_batch=8)
    session, sizes = on_gpu.session("image"), []
    on_gpu._sessions["image"] = type("OnGpu", (), {
        "get_providers": lambda self: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "run": lambda self, names, feeds: sizes.append(len(next(iter(feeds.values())))) or session.run(names, feeds)})()
    assert np.abs(on_gpu.embed_pixels(pixels) - whole).max() < 1e-5 and sizes == [19]
    with pytest.raises(InputError, match="image_sub_batch must be at least 1"):
        OnnxEmbedder(exported, device="cpu", image_sub_batch=0)  # would embed no rows at all


def test_runtime_choice_and_its_mistakes(bundle, exported):
    assert choose_runtime(str(exported)) == "onnx" and choose_runtime(str(bundle)) == "torch"
    with pytest.raises(ExportError, match="is a model bundle, not an ONNX export; run `mmretrieve export"):
        load_embedder(str(bundle), "onnx")
    with pytest.raises(ExportError, match="is an ONNX export, which the torch runtime cannot load"):
        load_embedder(str(exported), "torch")


class GpuOrt:
    """onnxruntime as a GPU build on a machine whose GPU provider fails to start."""

    def __getattr__(self, name):
        import onnxruntime

        return getattr(onnxruntime, name)

    @staticmethod
    def get_available_providers():
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    @staticmethod
    def InferenceSession(path, options, providers, provider_options, enable_fallback):
        import onnxruntime

        if providers[0] != "CPUExecutionProvider":
            raise RuntimeError(f"{providers[0]}: CUDA failure 100: no CUDA-capable device is detected")
        return onnxruntime.InferenceSession(path, options, providers=providers)


def test_providers_in_order_and_one_notice_on_cpu_fallback(exported, caplog):
    all_three = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [name for name, _ in choose_providers(GpuOrt, None, gpu_check=lambda: True)] == all_three
    assert choose_providers(GpuOrt, "cuda:1", gpu_check=lambda: True)[1] == ("CUDAExecutionProvider", {"device_id": 1})
    assert choose_providers(GpuOrt, "cpu") == [("CPUExecutionProvider", {})]
    with caplog.at_level("WARNING"):
        assert choose_providers(GpuOrt, None, gpu_check=lambda: False) == [("CPUExecutionProvider", {})]
    assert "no GPU is visible; running on CPU" in caplog.text
    with pytest.raises(MMRetrieveError, match="no CUDA device is visible"):
        choose_providers(GpuOrt, "cuda", gpu_check=lambda: False)

    caplog.clear()
    embedder = OnnxEmbedder(exported, device="cpu")
    embedder._ort, embedder._providers = GpuOrt(), choose_providers(GpuOrt, None, gpu_check=lambda: True)
    with caplog.at_level("WARNING"):
        assert embedder.embed_texts(["a dog"]).shape == (1, 16) and embedder.embed_images([random_image(0)]).shape == (1, 16)
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and notices[0].startswith("onnxruntime is running on CPU: TensorrtExecutionProvider")
    assert embedder.providers == ["CPUExecutionProvider"]


def test_session_settings_from_the_environment(exported, monkeypatch):
    monkeypatch.setenv("MMRETRIEVE_ORT_THREADS", "1")
    monkeypatch.setenv("MMRETRIEVE_ORT_OPTIMIZATION", "basic")
    embedder = OnnxEmbedder(exported, device="cpu")
    assert embedder._options.intra_op_num_threads == 1
    assert embedder.embed_texts([]).shape == (0, 16) and embedder.embed_images([]).shape == (0, 16)
    monkeypatch.setenv("MMRETRIEVE_ORT_OPTIMIZATION", "fastest")
    with pytest.raises(MMRetrieveError, match="optimisation level must be one of"):
        OnnxEmbedder(exported)


def test_search_process_with_the_onnx_runtime_never_imports_torch(bundle, exported, photos, tmp_path):
    index_images(photos, tmp_path / "idx", TorchEmbedder(str(bundle), device="cpu"), workers=0, progress=False)
    code = ("import sys; from mmretrieve.cli import main; sys.argv = ['mmretrieve', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    for query in (["a red dog"], ["--image", photos / "photo1.png"]):
        result = subprocess.run([sys.executable, "-c", code, "search", *map(str, query), "--index-dir", tmp_path / "idx",
                                 "--model", exported, "--runtime", "onnx", "--json", "-k", "2"],
                                capture_output=True, text=True, timeout=120)
        assert "HEAVY []" in result.stderr, result.stderr
        assert len(json.loads(result.stdout)) == 2


# What a text query on a flat index never needs: decoding images, the other index kinds, the index
# builder, a scan of the installed distributions (the entry points are cached), torch.
NOT_FOR_A_TEXT_QUERY = ("PIL", "mmretrieve.images", "mmretrieve.index.hnsw", "mmretrieve.index.ivfpq",
                        "mmretrieve.index.choose", "mmretrieve.progress", "mmretrieve.index.builder",
                        "multiprocessing", "mmretrieve.config", "importlib.metadata", "torch")


def test_a_text_search_process_loads_only_what_a_text_query_needs(exported, photos, tmp_path):
    """A fresh `mmretrieve search QUERY` starts sooner for what it does not import (issue 17 item 6)."""
    index_images(photos, tmp_path / "idx", OnnxEmbedder(exported, device="cpu"), index_type="flat", workers=0,
                 progress=False)
    code = ("import sys; from mmretrieve.cli import main; sys.argv = ['mmretrieve', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            f"print('LOADED', [m for m in {NOT_FOR_A_TEXT_QUERY!r} if m in sys.modules], file=sys.stderr)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "MMRETRIEVE_PLUGIN_CACHE": "1"}

    def search(*query):
        result = subprocess.run([sys.executable, "-c", code, "search", *map(str, query), "--index-dir", tmp_path / "idx",
                                 "--model", exported, "--json", "-k", "2"], capture_output=True, text=True,
                                timeout=120, env=env)
        assert result.returncode == 0 and len(json.loads(result.stdout)) == 2, result.stderr
        return result.stderr.split("LOADED ", 1)[1].strip()

    search("a red dog")  # the first command of this cache folder scans the distributions and remembers them
    assert search("a red dog") == "[]"
    assert search("--image", photos / "photo1.png") == "['PIL', 'mmretrieve.images']"  # an image query decodes


def test_export_command_writes_a_folder_and_prints_parity(bundle, tmp_path):
    result = run_cli("export", "--model", bundle, "--out", tmp_path / "export", "--opset", 17)
    assert result.exit_code == 0, result.output
    assert "fp32 vs PyTorch min cosine" in result.output
    assert read_export_info(tmp_path / "export").manifest["opset"] == 17
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"export.json", "text.onnx", "image.onnx", "text",
                                                                "image"}
    again = run_cli("export", "--model", bundle, "--out", tmp_path / "export", "--json")  # replaces it
    assert again.exit_code == 0 and json.loads(again.stdout)["fingerprint"] == read_bundle_info(bundle).fingerprint


def test_eval_with_the_onnx_runtime_matches_torch(bundle, exported, colours):
    by_torch = json.loads(run_cli("eval", "--model", bundle, "--data", colours, "--workers", 0, "--json").stdout)
    result = run_cli("eval", "--model", exported, "--data", colours, "--workers", 0, "--json")
    assert result.exit_code == 0, result.output
    by_onnx = json.loads(result.stdout)
    # Embeddings agree to ~1e-7, but the tiny random model has near-tied scores, so at most one
    # query per direction may land on the other side of the top-5 cut.
    records = [json.loads(line) for line in Path(colours).read_text().splitlines() if line.strip()]
    queries = {"t2i": sum(len(r["captions"]) for r in records), "i2t": len(records)}
    for direction in ("t2i", "i2t"):
        assert by_onnx[direction]["R@5"] == pytest.approx(by_torch[direction]["R@5"], abs=100 / queries[direction] + 0.01)


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/bundle", "--out", "x"], "no model folder at no/such/bundle"),
    (["--model", "B", "--out", "x", "--int8", "--fp16"], "give at most one of --fp16 and --int8"),
    (["--model", "B", "--out", "x", "--int8"], "give --eval-data FILE to check that retrieval recall holds"),
    (["--model", "B", "--out", "x", "--opset", "11"], "--opset must be between 17 and 20, not 11"),
    (["--model", "B", "--out", "NOT_EMPTY"], "exists and is not an ONNX export; choose a new --out folder"),
])
def test_export_mistakes_are_one_sentence(bundle, tmp_path, args, message):
    (tmp_path / "NOT_EMPTY").mkdir()
    (tmp_path / "NOT_EMPTY" / "keep.txt").write_text("precious")
    args = [str(bundle) if a == "B" else str(tmp_path / a) if a in ("x", "NOT_EMPTY") else a for a in args]
    result = run_cli("export", *args)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "NOT_EMPTY" / "keep.txt").read_text() == "precious"
    assert not os.path.exists(tmp_path / "x")
