"""`export --int8 --calibration IMAGES`: the image tower in static int8 (QDQ on its convolutions,
calibrated on the user's images), judged by the same recall gate; without calibration images int8
keeps the image tower fp32, and calibration is refused for other precisions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import random_image
from tiny_models import make_colour_dataset

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.onnx, pytest.mark.slow]

from mmretrieve.bundle import save_bundle  # noqa: E402
from mmretrieve.cli import cli  # noqa: E402
from mmretrieve.export import ExportError  # noqa: E402
from mmretrieve.export.exporter import export_model  # noqa: E402
from mmretrieve.model import build_model  # noqa: E402
from mmretrieve.runtime.onnx_runtime import OnnxEmbedder  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_model_config, tmp_path_factory):
    torch.manual_seed(0)
    return save_bundle(build_model(tiny_model_config), tmp_path_factory.mktemp("static") / "bundle").path


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), per_colour=2)


def test_calibrated_int8_quantises_the_image_convolutions_and_keeps_the_head_fp32(bundle, colours, tmp_path):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for seed in range(10):
        random_image(seed, (90, 70)).save(calibration / f"photo{seed}.png")
    (calibration / "notes.txt").write_text("not an image")
    # forced: the random tiny model's recall is near chance, so int8 moves it by whole queries
    result = CliRunner().invoke(cli, ["export", "--model", str(bundle), "--out", str(tmp_path / "int8"), "--int8",
                                      "--calibration", str(calibration), "--eval-data", str(colours), "--force",
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    settings = manifest["int8_settings"]
    assert settings["towers"] == ["text", "image"] and settings["image"]["calibration_images"] == 10
    assert set(manifest["recall"]["results"]) == {"fp32", "int8"}
    assert manifest["agreement"]["image"]["min_cosine"] > 0.9  # measured, not gated
    graph = onnx.load(str(tmp_path / "int8" / "image.onnx")).graph
    made_by = {output: node for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(made_by[node.input[1]].op_type == "DequantizeLinear" for node in convs)
    heads = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    assert heads and not any(made_by.get(name) is not None and made_by[name].op_type == "DequantizeLinear"
                             for node in heads for name in node.input)
    embedder = OnnxEmbedder(tmp_path / "int8", device="cpu")
    rows = embedder.embed_images([random_image(seed, (80, 60)) for seed in range(20, 23)])
    assert rows.shape == (3, 16) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_calibration_goes_with_int8_only(bundle, tmp_path, precision):
    random_image(0).save(tmp_path / "photo.png")
    with pytest.raises(ExportError, match=f"goes with --int8, not an {precision} export"):
        export_model(str(bundle), tmp_path / "out", precision=precision, force=True, calibration=tmp_path / "photo.png")
    assert not (tmp_path / "out").exists()


def test_a_calibration_folder_without_images_is_one_sentence(bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images to calibrate int8 with"):
        export_model(str(bundle), tmp_path / "out", precision="int8", force=True, calibration=tmp_path / "empty")


def test_int8_towers_quantises_only_the_towers_named(bundle, tmp_path):
    random_image(0).save(tmp_path / "photo.png")
    fp32 = tmp_path / "fp32"
    export_model(str(bundle), fp32)
    manifest = export_model(str(bundle), tmp_path / "image-only", precision="int8", force=True,
                            calibration=tmp_path / "photo.png", int8_towers=["image"])
    assert manifest["int8_settings"]["towers"] == ["image"] and manifest["int8_settings"]["image"]["calibration_images"] == 1
    # the dynamic MatMul settings are the text tower's: not listed when it is left fp32
    assert set(manifest["int8_settings"]) == {"towers", "image"}
    assert manifest["int8_settings"]["image"]["exporting_cpu_vnni"] in (True, False, "unknown")
    # the text graph stays fp32 where its int8 loses recall (the default model's does on flickr8k-dev)
    assert (tmp_path / "image-only" / "text.onnx").read_bytes() == (fp32 / "text.onnx").read_bytes()
    assert (tmp_path / "image-only" / "image.onnx").read_bytes() != (fp32 / "image.onnx").read_bytes()
    with pytest.raises(ExportError, match="an int8 image tower is calibrated on images: give --calibration"):
        export_model(str(bundle), tmp_path / "out", precision="int8", force=True, int8_towers=["image"])
    with pytest.raises(ExportError, match="goes with --int8, not an fp32 export"):
        export_model(str(bundle), tmp_path / "out", int8_towers=["text"])
    with pytest.raises(ExportError, match="--calibration calibrates the image tower's int8, which --int8-towers leaves"):
        export_model(str(bundle), tmp_path / "out", precision="int8", force=True, calibration=tmp_path / "photo.png",
                     int8_towers=["text"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx_vnni\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd\n", "unknown"),  # an Arm CPU lists no x86 flags
    (None, "unknown"),  # no /proc (another OS)
])
def test_the_export_records_whether_its_cpu_had_vnni(monkeypatch, tmp_path, cpuinfo, expected):
    # Static int8 (uint8 activations, int8 weights, no reduce_range) may saturate on x86 without
    # VNNI, so export.json says which kind of CPU the recall gate ran on.
    from mmretrieve.export import precision

    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    monkeypatch.setattr(precision, "CPUINFO", path)
    assert precision.cpu_vnni() == expected
