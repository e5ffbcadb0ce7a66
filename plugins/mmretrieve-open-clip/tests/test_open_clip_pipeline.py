"""An open_clip pair through the rest of mmretrieve: ONNX export and torch-free search, training
from the pair, and a multilingual (xlm-roberta) pair queried in Chinese."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmretrieve.bundle import load_bundle, resolve_model
from mmretrieve.cli import cli
from mmretrieve.plugins import reset_host
from mmretrieve.train.checkpoint import load_checkpoint

from tiny_open_clip import MULTILINGUAL


@pytest.fixture(autouse=True)
def fresh_host():
    reset_host()
    yield
    reset_host()


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
@pytest.mark.onnx
def test_export_parity_and_a_search_without_torch(tiny_clip_dir, photos, tmp_path):
    ref = f"open-clip:local-dir:{tiny_clip_dir}"
    result = invoke("export", "--model", ref, "--out", tmp_path / "export")
    assert "text: fp32 vs PyTorch min cosine" in result.output
    cosines = [float(line.rsplit(" ", 1)[-1]) for line in result.output.splitlines() if "min cosine" in line]
    assert len(cosines) == 2 and min(cosines) >= 0.9999
    invoke("index", photos, "--model", tmp_path / "export", "--index-dir", tmp_path / "idx", "--workers", 0)
    code = ("import sys; from mmretrieve.cli import main; sys.argv = ['mmretrieve', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
            "print('HEAVY', [m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules], file=sys.stderr)")
    torch_scores = {h["path"]: h["score"] for h in json.loads(invoke(
        "search", "a cat", "--model", ref, "--index-dir", tmp_path / "idx", "--json", "-k", 4, "--runtime", "torch"
    ).stdout)}
    for query in (["a cat"], ["--image", photos / "chelsea.png"]):
        out = subprocess.run([sys.executable, "-c", code, "search", *map(str, query), "--index-dir", tmp_path / "idx",
                              "--model", tmp_path / "export", "--runtime", "onnx", "--json", "-k", "4"],
                             capture_output=True, text=True, timeout=300)
        assert "HEAVY []" in out.stderr, out.stderr
        hits = json.loads(out.stdout)
        assert len(hits) == 4
        if query == ["a cat"]:  # onnxruntime scores as PyTorch does
            for hit in hits:
                assert hit["score"] == pytest.approx(torch_scores[hit["path"]], abs=1e-4)
        else:
            assert hits[0]["path"].endswith("chelsea.png") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_train_from_the_pair_in_lit_mode(tiny_clip_dir, tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    (tmp_path / "images").mkdir()
    for i, (colour, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))] * 5):
        pixels = np.clip(np.array(rgb)[None, None] + rng.integers(-25, 26, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "captions": [f"a {colour} square", f"{colour}"]}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    ref = f"open-clip:local-dir:{tiny_clip_dir}"
    result = invoke("train", "--init", ref, "--data", tmp_path / "pairs.jsonl", "--image-mode", "frozen",
                    "--text-mode", "full", "--epochs", 1, "--batch-size", 4, "-o", tmp_path / "run",
                    "--set", "workers=0", "--set", "val_size=3")
    assert "trained 3 steps" in result.stdout and "start" in result.stdout and "gain" in result.stdout
    start, tuned = load_bundle(resolve_model(ref)), load_bundle(tmp_path / "run" / "best")
    # LiT: the image tower is the checkpoint's (locked); the text tower moved in the run.
    for name, value in start.image_tower.state_dict().items():
        torch.testing.assert_close(tuned.image_tower.state_dict()[name], value)
    last = load_checkpoint(tmp_path / "run" / "checkpoint")["model"]
    assert [n for n, v in start.text_tower.state_dict().items() if not torch.equal(last[f"text_tower.{n}"], v)]
    # The best bundle holds the trained text tower, or the pair itself if the start stayed best.
    best_step = json.loads((tmp_path / "run" / "summary.json").read_text())["best_step"]
    moved = [n for n, v in start.text_tower.state_dict().items() if not torch.equal(tuned.text_tower.state_dict()[n], v)]
    assert bool(moved) == (best_step > 0)


def test_multilingual_pair_tokenizes_and_scores_as_open_clip(multilingual_dir, photos, tmp_path):
    import open_clip

    ref = f"open-clip:local-dir:{multilingual_dir}"
    model = load_bundle(resolve_model(ref)).eval()
    reference = open_clip.create_model(f"local-dir:{multilingual_dir}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{multilingual_dir}")
    queries = ["两只猫在沙发上睡觉", "ein Hund läuft", "  Deux   CHATS  sur le canapé "]
    ids = model.text_encoder.preprocess(queries)["input_ids"]
    expected = tokenizer(queries).numpy()
    np.testing.assert_array_equal(ids, expected[:, :ids.shape[1]])
    assert (expected[:, ids.shape[1]:] == 1).all()  # the rest is XLM-R's padding
    with torch.no_grad():
        expected_text = reference.encode_text(tokenizer(queries), normalize=True).numpy()
    np.testing.assert_allclose(model.embed("text", queries), expected_text, atol=1e-5, rtol=0)
    # The xlm-roberta tower's linear projection is the head; the tower gives mean-pooled features.
    torch.testing.assert_close(model.text_head.weight, reference.text.proj.weight)

    invoke("index", photos, "--model", ref, "--index-dir", tmp_path / "idx", "--workers", 0)
    hits = json.loads(invoke("search", MULTILINGUAL[7], "--index-dir", tmp_path / "idx", "--json", "-k", 4).stdout)
    images = [Image.open(photos / h["path"].rsplit("/", 1)[-1]).convert("RGB") for h in hits]
    with torch.no_grad():
        query = reference.encode_text(tokenizer([MULTILINGUAL[7]]), normalize=True)
        _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{multilingual_dir}")
        image = reference.encode_image(torch.stack([transform(i) for i in images]), normalize=True)
    np.testing.assert_allclose([h["score"] for h in hits], (query @ image.T)[0].numpy(), atol=1e-5)
