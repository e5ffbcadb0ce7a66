"""The open-clip plugin against open_clip itself, on tiny random pairs (no hub, no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmretrieve.bundle import load_bundle, read_bundle_info, resolve_model
from mmretrieve.cli import cli
from mmretrieve.errors import InputError
from mmretrieve.plugins import reset_host

from tiny_open_clip import TINY_CONFIG, save_open_clip_folder, save_tiny_xlm_roberta, variant_config

TEXTS = [
    "A dog runs on the beach.",
    "HELLO, World!!! it's 3:45pm; isn't it?",
    "Café crème brûlée — naïve façade, Ångström",
    "“Curly quotes” and ‘single’ ones",
    "ﬁne ﬂowers ＡＢＣ１２３",
    "Tom &amp; Jerry &lt;3",
    "  lots   of \n whitespace\t here ",
    " ".join(f"word{i}" for i in range(100)),  # far over 77 tokens: truncated, ending with the end token
    "日本語のテキスト 中文 한국어",
    "emoji 🐶🐱 and rock'n'roll, don't we've",
    "",
]


@pytest.fixture(autouse=True)
def fresh_host():
    reset_host()
    yield
    reset_host()


def open_clip_reference(folder):
    """open_clip's own model, tokenizer and eval transform for a local-dir folder."""
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), open_clip.get_tokenizer(f"local-dir:{folder}"), transform


def reference_embeddings(folder, texts, images):
    model, tokenizer, transform = open_clip_reference(folder)
    with torch.no_grad():
        text = model.encode_text(tokenizer(texts), normalize=True).numpy()
        image = model.encode_image(torch.stack([transform(i) for i in images]), normalize=True).numpy()
    return text, image, model


def load_photos(folder):
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def test_listing_plugins_imports_neither_torch_nor_open_clip():
    code = ("import sys; from mmretrieve.plugins import get_host; host = get_host(); "
            "assert 'open-clip' in host.registry('model') and 'open-clip-text' in host.registry('encoder'); "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenizer_ids_equal_open_clips():
    import open_clip

    from mmretrieve_open_clip.preprocessing import text_preprocessor

    expected = open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy()
    ids = text_preprocessor(TINY_CONFIG)(TEXTS)["input_ids"]  # padded to the longest text, with 0
    assert ids.shape[1] == 77  # the long text fills the context
    np.testing.assert_array_equal(ids, expected)
    assert ids[7, -1] == 49407 and ids[7, 0] == 49406  # truncated, still ends with <end_of_text>


@pytest.mark.parametrize("preprocess_cfg", [
    {},  # open_clip's defaults: 224 px, bicubic, OpenAI mean/std, shortest side then centre crop
    {"size": 64, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    {"size": 48, "resize_mode": "squash"},  # SigLIP's: the whole image to the square
])
def test_image_preprocessing_equals_open_clips_transform(photos, preprocess_cfg):
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    from dataclasses import asdict

    from mmretrieve.preprocess import ImagePreprocessor
    from mmretrieve_open_clip.preprocessing import image_config

    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess_cfg)
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    ours = ImagePreprocessor(image_config(cfg))
    for image in load_photos(photos):
        # Both resize with Pillow and normalise in float32: equal up to float rounding.
        np.testing.assert_allclose(ours.transform(image), transform(image).numpy(), atol=1e-5, rtol=0)


def test_scores_equal_open_clips_cosine_and_projections_are_the_heads(tiny_clip_dir, photos):
    model = load_bundle(resolve_model(f"open-clip:local-dir:{tiny_clip_dir}")).eval()
    images = load_photos(photos)
    text, image, reference = reference_embeddings(tiny_clip_dir, TEXTS, images)
    ours_text, ours_image = model.embed("text", TEXTS), model.embed("image", images)
    np.testing.assert_allclose(ours_text @ ours_image.T, text @ image.T, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_text, text, atol=1e-5, rtol=0)
    # The checkpoint's projections are the linear heads (x @ P, so the weight is P.T), and its temperature is kept.
    torch.testing.assert_close(model.text_head.weight, reference.text_projection.detach().T)
    torch.testing.assert_close(model.image_head.weight, reference.visual.proj.detach().T)
    assert model.logit_scale.item() == pytest.approx(3.0)
    assert model.text_encoder.dim == 64 and model.embed_dim == 32


@pytest.mark.parametrize("kind, split", [("siglip", {"text": False, "image": True}),
                                         ("mobileclip", {"text": True, "image": False})])
def test_other_open_clip_families_score_as_open_clip(kind, split, tmp_path, photos):
    import shutil

    hf = save_tiny_xlm_roberta(tmp_path / "tokenizer") if kind == "siglip" else None
    folder = save_open_clip_folder(tmp_path / kind, *variant_config(kind, hf))
    if hf is not None:  # open_clip reads a local-dir pair's HF tokenizer from its folder
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(hf / name, folder / name)
    ref = f"open-clip:local-dir:{folder}"
    model = load_bundle(resolve_model(ref)).eval()
    texts = ["Deux chats, sur le canapé!", "a dog_runs on the beach", "两只猫在沙发上睡觉"]
    _, tokenizer, _ = open_clip_reference(folder)
    ids = model.text_encoder.preprocess(texts)["input_ids"]
    np.testing.assert_array_equal(ids, tokenizer(texts).numpy()[:, :ids.shape[1]])
    images = load_photos(photos)
    text, image, reference = reference_embeddings(folder, texts, images)
    np.testing.assert_allclose(model.embed("text", texts), text, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.embed("image", images), image, atol=1e-5, rtol=0)
    # Only a bias-free linear projection becomes a head; the others stay in their tower.
    assert {"text": model.text_encoder.projection is not None,
            "image": model.image_encoder.projection is not None} == split
    bias = read_bundle_info(resolve_model(ref)).manifest["metadata"]["logit_bias"]
    assert bias == (pytest.approx(reference.logit_bias.detach().item()) if kind == "siglip" else None)


def test_bundle_refers_to_the_checkpoint_and_rebuilds_its_architecture_offline(tiny_clip_dir):
    from mmretrieve.encoders.factory import rebuild_encoder

    folder = resolve_model(f"open-clip:local-dir:{tiny_clip_dir}")
    info = read_bundle_info(folder)
    towers = info.model["towers"]
    assert towers["text"]["reference"]["encoder"] == "open-clip-text"
    assert towers["image"]["reference"]["options"]["model_name"] == f"local-dir:{tiny_clip_dir}"
    assert info.manifest["metadata"]["source"]["kind"] == "open_clip"
    assert info.manifest["metadata"]["source"]["checkpoint"] == f"local-dir:{tiny_clip_dir}"  # what `info` shows
    assert info.manifest["stored_parameters"] < 10_000  # heads and temperature only; the towers are referenced
    # The tower folder's open_clip_config.json alone rebuilds the architecture (no hub, no checkpoint).
    loaded = load_bundle(folder)
    for name in ("text", "image"):
        rebuilt = rebuild_encoder(towers[name]["family"], folder / name, towers[name]["options"])
        original = getattr(loaded, f"{name}_encoder").module.state_dict()
        assert {k: v.shape for k, v in rebuilt.module.state_dict().items()} == {k: v.shape for k, v in original.items()}
    assert resolve_model(f"open-clip:local-dir:{tiny_clip_dir}") == folder  # cached, not built again


def test_a_checkpoint_file_of_a_named_architecture_and_the_encoder_prefixes(tmp_path, tiny_clip_dir, photos):
    import open_clip
    from safetensors.torch import load_file

    from mmretrieve.encoders import create_encoder

    config = tmp_path / "mmr-tiny-open-clip.json"  # open_clip finds architectures by their file name
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(load_file(str(tiny_clip_dir / "open_clip_model.safetensors")), checkpoint)
    by_file = load_bundle(resolve_model(f"open-clip:mmr-tiny-open-clip:{checkpoint}"))
    by_folder = load_bundle(resolve_model(f"open-clip:local-dir:{tiny_clip_dir}"))
    images = load_photos(photos)[:2]
    np.testing.assert_allclose(by_file.embed("image", images), by_folder.embed("image", images), atol=1e-6)
    text = create_encoder(f"open-clip-text:mmr-tiny-open-clip:{checkpoint}")
    assert text.dim == 64 and text.projection.shape == (32, 64)
    assert set(text.layer_groups()[0]) >= {"text.token_embedding.weight", "text.positional_embedding"}
    assert len(text.layer_groups()) == 4  # embeddings, 2 blocks, final norm


def test_letterboxing_is_refused_in_one_sentence():
    from mmretrieve_open_clip.preprocessing import image_config

    with pytest.raises(InputError, match="'longest' image resizing .* is not supported"):
        image_config({"size": 224, "resize_mode": "longest"})


@pytest.mark.parametrize("ref, sentence", [
    ("open-clip:ViT-B-32", "names no weights"),
    ("open-clip:No-Such-Arch:some_tag", "is not an open_clip model"),
    ("open-clip:ViT-B-32:no_such_tag", "no pretrained 'no_such_tag' for open_clip's ViT-B-32: .*laion2b_s34b_b79k"),
    ("open-clip:ViT-B-32:/no/such/checkpoint.pt", "no checkpoint file at /no/such/checkpoint.pt"),
    ("open-clip:local-dir:/no/such/folder", "cannot read the open_clip config"),
])
def test_a_bad_name_is_one_sentence(ref, sentence, tmp_path, photos):
    import re

    result = CliRunner().invoke(cli, ["index", str(photos), "--model", ref, "--index-dir", str(tmp_path / "index")])
    assert result.exit_code != 0 and re.search(sentence, result.output), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    with pytest.raises(InputError, match=sentence):
        resolve_model(ref)


def test_a_tag_neither_cached_nor_reachable_says_how_to_work_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"open_clip's ViT-B-32 \(laion2b_s34b_b79k\) is not in the local cache .*"
                                         r"open-clip:ARCH:/path/to/checkpoint.*open-clip:local-dir:PATH"):
        resolve_model("open-clip:ViT-B-32:laion2b_s34b_b79k")


def test_index_and_search_both_directions_through_the_cli(tiny_clip_dir, photos, tmp_path):
    ref = f"open-clip:local-dir:{tiny_clip_dir}"
    runner = CliRunner()
    images_index, texts_index = tmp_path / "images", tmp_path / "texts"
    result = runner.invoke(cli, ["index", str(photos), "--model", ref, "--index-dir", str(images_index),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["search", "a cat on a sofa", "--index-dir", str(images_index), "--json", "-k", "4"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    text, image, _ = reference_embeddings(tiny_clip_dir, ["a cat on a sofa"], load_photos(photos))
    expected = dict(zip(sorted(p.name for p in photos.glob("*.png")), (text @ image.T)[0]))
    assert len(hits) == 4
    for hit in hits:  # the score a search returns is open_clip's own cosine similarity
        assert hit["score"] == pytest.approx(float(expected[hit["path"].rsplit("/", 1)[-1]]), abs=1e-5)

    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": str(p), "captions": [f"a photo called {p.stem}"]}) + "\n"
                                for p in sorted(photos.glob("*.png"))))
    result = runner.invoke(cli, ["index", "--texts", str(captions), "--model", ref, "--index-dir", str(texts_index)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["search", "--image", str(photos / "rocket.png"), "--index-dir", str(texts_index),
                                 "--json", "-k", "4"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 4 and all(-1 <= h["score"] <= 1 for h in hits)


def test_open_clip_models_command_lists_pretrained_pairs():
    import click

    from mmretrieve.plugins import get_host

    group = click.Group()
    get_host().call_each("register_commands", cli=group)  # as `mmretrieve` adds plugin commands
    result = CliRunner().invoke(group, ["open-clip-models", "ViT-B-32"])
    assert result.exit_code == 0, result.output
    names = result.stdout.split()
    assert "open-clip:ViT-B-32:laion2b_s34b_b79k" in names and all(n.startswith("open-clip:") for n in names)
    assert not any("coca" in n.lower() for n in CliRunner().invoke(group, ["open-clip-models"]).stdout.split())
