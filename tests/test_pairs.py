"""Pretrained transformers pairs (CLIP, SigLIP, Chinese-CLIP) as models: `--model clip:local-dir:PATH`.

Every check runs on tiny random checkpoints written with save_pretrained (tests/tiny_pairs.py):
the score a search returns is the checkpoint's own cosine similarity, our torch-free
preprocessing is the checkpoint's processor, the cached bundle is reused and rebuilt when the
checkpoint changes, and an unreachable hub id is one sentence.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import random_image
from mmretrieve.cli import cli

PAIRS = ("clip", "siglip", "chinese-clip")
TEXTS = ["a dog runs on the grass", "A black cat, sleeping on a RED sofa!", "astronaut on the moon", "一只狗在草地上跑"]


def photos() -> list[Image.Image]:
    """Real photographs of several shapes (one with an odd crop margin: 640x427 -> 47x32)."""
    import skimage.data as data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.fromarray(data.chelsea()),
            Image.fromarray(data.rocket())]


def checkpoint_scores(folder, kind: str, feeds: dict[str, np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """The checkpoint's own text-image cosine similarities, on the very inputs our preprocessing made:
    CLIP's logits_per_text / logit_scale, SigLIP's (logits_per_text - logit_bias) / logit_scale."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    inputs = {"input_ids": torch.from_numpy(feeds["input_ids"]), "pixel_values": torch.from_numpy(pixels)}
    if kind != "siglip":  # SigLIP's processor gives no attention mask: its text tower sees all 64 positions
        inputs["attention_mask"] = torch.from_numpy(feeds["attention_mask"])
    with torch.no_grad():
        logits = model(**inputs).logits_per_text
        bias = model.logit_bias if kind == "siglip" else 0.0
        return ((logits - bias) / model.logit_scale.exp()).numpy()


@pytest.mark.parametrize("kind", PAIRS)
def test_scores_are_the_checkpoints_cosine(tiny_pairs, kind):
    """Through the torch runtime (what index and search use): every text-image score equals the
    checkpoint's own cosine to 1e-5, on texts with case, punctuation and Chinese."""
    from mmretrieve.runtime import load_embedder

    embedder = load_embedder(f"{kind}:local-dir:{tiny_pairs[kind]}", runtime="torch", device="cpu")
    pixels = embedder.image_preprocessor(photos())["pixel_values"]
    ours = embedder.embed_texts(TEXTS) @ embedder.embed_pixels(pixels).T
    theirs = checkpoint_scores(tiny_pairs[kind], kind, embedder.text_preprocessor(TEXTS), pixels)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(theirs).max() > 0.01  # not a degenerate all-zero comparison


@pytest.mark.parametrize("kind", PAIRS)
def test_preprocessing_is_the_checkpoints_processor(tiny_pairs, kind):
    """Token ids equal the checkpoint's tokenizer's (SigLIP: padded to 64); pixels equal its PIL
    image processor's exactly, and its default (torchvision) one's within 0.02 (a resampling
    difference of a few 1/255 steps, normalised)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from mmretrieve.bundle import load_bundle

    model = load_bundle(f"{kind}:local-dir:{tiny_pairs[kind]}")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pairs[kind]))
    padding = dict(padding="max_length", max_length=64) if kind == "siglip" else dict(padding=True)
    expected = tokenizer(TEXTS, truncation=True, return_tensors="np", **padding)["input_ids"]
    assert np.array_equal(model.preprocess("text", TEXTS)["input_ids"], expected)
    ours = model.preprocess("image", photos())["pixel_values"]
    pil = AutoImageProcessor.from_pretrained(str(tiny_pairs[kind]), backend="pil")
    assert np.array_equal(ours, pil(images=photos(), return_tensors="np")["pixel_values"])
    default = AutoImageProcessor.from_pretrained(str(tiny_pairs[kind]))
    assert np.abs(ours - default(images=photos(), return_tensors="np")["pixel_values"]).max() < 0.02


def test_index_and_search_both_directions_through_the_cli(tiny_pairs, tmp_path, run):
    """`index --model clip:local-dir:PATH`, then `search` by text and by image without --model (the
    index records the prefixed reference); the text search's scores are the checkpoint's cosines."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, photo in enumerate(photos()[:3]):
        photo.save(folder / f"p{i}.png")
    index = tmp_path / "idx"
    ref = f"clip:local-dir:{tiny_pairs['clip']}"
    assert run("index", folder, "--model", ref, "--index-dir", index).exit_code == 0
    assert json.loads((index / "manifest.json").read_text())["model"]["ref"] == ref
    result = run("search", "a dog runs on the grass", "--index-dir", index, "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert len(hits) == 3
    from mmretrieve.bundle import load_bundle

    model = load_bundle(ref)
    names = [f"p{i}.png" for i in range(3)]
    pixels = model.preprocess("image", [Image.open(folder / name).convert("RGB") for name in names])["pixel_values"]
    cosine = checkpoint_scores(tiny_pairs["clip"], "clip", model.preprocess("text", [TEXTS[0]]), pixels)[0]
    for hit in hits:
        assert abs(hit["score"] - cosine[names.index(hit["path"].rsplit("/", 1)[-1])]) < 1e-5
    by_image = json.loads(run("search", "--image", folder / "p1.png", "--index-dir", index, "--json").output)
    assert by_image[0]["path"].endswith("p1.png") and by_image[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_a_chinese_query_end_to_end(tiny_pairs, tmp_path, run):
    """A save_pretrained folder as --model PATH; a Chinese query scores as the checkpoint does."""
    folder = tmp_path / "photos"
    folder.mkdir()
    random_image(1, (64, 48)).save(folder / "a.png")
    random_image(2, (48, 64)).save(folder / "b.png")
    index = tmp_path / "idx"
    assert run("index", folder, "--model", tiny_pairs["chinese-clip"], "--index-dir", index).exit_code == 0
    result = run("search", "一只狗在草地上跑", "--index-dir", index, "--json")
    assert result.exit_code == 0, result.output
    from mmretrieve.bundle import load_bundle

    model = load_bundle(str(tiny_pairs["chinese-clip"]))
    feeds = model.preprocess("text", ["一只狗在草地上跑"])
    assert (feeds["input_ids"][0] > 4).sum() == 8  # eight known characters, none [UNK]
    for hit in json.loads(result.output):
        pixels = model.preprocess("image", [Image.open(hit["path"]).convert("RGB")])["pixel_values"]
        assert abs(hit["score"] - checkpoint_scores(tiny_pairs["chinese-clip"], "chinese-clip", feeds, pixels)[0, 0]) \
            < 1e-5


def test_the_bundle_is_cached_reused_and_rebuilt_when_the_checkpoint_changes(tiny_pairs, tmp_path, monkeypatch, run):
    from tiny_pairs import tiny_clip

    from mmretrieve.bundle import read_bundle_info, resolve_model
    from mmretrieve.pairs import hf

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_pairs["clip"], checkpoint)
    builds = []
    real = hf.pair_parts
    monkeypatch.setattr(hf, "pair_parts", lambda *a: builds.append(a) or real(*a))
    ref = f"clip:local-dir:{checkpoint}"
    first = resolve_model(ref)
    info = read_bundle_info(ref)
    assert info.manifest["stored_parameters"] < 3000  # heads and temperature only: the towers are referenced
    assert info.manifest["metadata"]["source"]["checkpoint"] == str(checkpoint)
    assert resolve_model(ref) == first and resolve_model(checkpoint) == first and len(builds) == 1
    shown = run("info", ref)
    assert shown.exit_code == 0 and f"source:       clip {checkpoint}" in shown.output
    tiny_clip(checkpoint, seed=1)  # new weights under the same folder
    assert resolve_model(ref) == first and len(builds) == 2
    assert read_bundle_info(ref).fingerprint != info.fingerprint
    from mmretrieve.bundle import load_bundle

    # In the same process too: nothing cached from the old weights (towers, reference digests) is used.
    assert load_bundle(ref).text_encoder.options["revision"] != info.model["towers"]["text"]["options"]["revision"]


def test_a_self_contained_bundle_rebuilds_the_towers_offline(tiny_pairs, tmp_path):
    """Stored with every weight (not by reference), a pair's towers are rebuilt from the config.json
    and tokenizer in the bundle, without the checkpoint folder."""
    from mmretrieve.bundle import load_bundle, save_bundle

    checkpoint = shutil.copytree(tiny_pairs["siglip"], tmp_path / "ckpt")
    model = load_bundle(f"siglip:local-dir:{checkpoint}")
    save_bundle(model, tmp_path / "own")
    shutil.rmtree(checkpoint)  # the towers must not need the checkpoint any more
    rebuilt = load_bundle(tmp_path / "own")
    assert rebuilt.text_encoder.preprocessor.config.padding == "max_length"
    for modality, items in (("text", TEXTS), ("image", photos()[:2])):
        assert np.allclose(rebuilt.embed(modality, items), model.embed(modality, items), atol=1e-6)


def test_an_unreachable_hub_id_is_one_sentence(tiny_pairs, tmp_path, monkeypatch, run):
    from mmretrieve.bundle import resolve_model
    from mmretrieve.encoders import hub
    from mmretrieve.errors import InputError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty model cache
    hub.hub_reachable.cache_clear()
    with pytest.raises(InputError, match="local-dir:PATH") as caught:
        resolve_model("clip:nobody/no-such-clip")
    assert "'nobody/no-such-clip'" in str(caught.value) and "HF_HUB_OFFLINE" in str(caught.value)
    result = CliRunner().invoke(cli, ["index", str(tmp_path), "--model", "clip:nobody/no-such-clip",
                                      "--index-dir", str(tmp_path / "idx")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "clip:local-dir:PATH" in result.output and len(result.output.strip().splitlines()) == 1
    hub.hub_reachable.cache_clear()


def test_a_prefix_that_disagrees_with_the_checkpoint_is_one_sentence(tiny_pairs):
    from mmretrieve.bundle import resolve_model
    from mmretrieve.errors import InputError

    with pytest.raises(InputError, match=r"is a 'clip' checkpoint, not a siglip one; use --model clip:"):
        resolve_model(f"siglip:local-dir:{tiny_pairs['clip']}")
    with pytest.raises(InputError, match="no such folder"):
        resolve_model("clip:local-dir:/nonexistent/checkpoint")


def test_a_checkpoint_whose_json_files_are_damaged_is_one_sentence(tiny_pairs, tmp_path):
    from mmretrieve.bundle import resolve_model
    from mmretrieve.errors import InputError

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "clip",')  # cut short
    with pytest.raises(InputError, match="config.json"):
        resolve_model(f"clip:local-dir:{tmp_path / 'bad'}")
    checkpoint = shutil.copytree(tiny_pairs["clip"], tmp_path / "ckpt")
    (checkpoint / "preprocessor_config.json").write_text("[1, 2")
    with pytest.raises(InputError, match="preprocessor_config.json"):
        resolve_model(f"clip:local-dir:{checkpoint}")


def test_siglip2_takes_fixed_resolution_checkpoints_and_refuses_naflex(tiny_pairs, tmp_path):
    """A fixed-resolution SigLIP 2 checkpoint is a `siglip` model type (SiglipModel, Gemma
    tokenizer): siglip2: takes it; a NaFlex one (model_type siglip2, variable patches) is one sentence."""
    from mmretrieve.bundle import read_bundle_info
    from mmretrieve.errors import InputError

    assert read_bundle_info(f"siglip2:local-dir:{tiny_pairs['siglip']}").manifest["metadata"]["source"]["kind"] \
        == "siglip2"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(InputError, match="NaFlex"):
        read_bundle_info(f"siglip2:local-dir:{tmp_path}")
    with pytest.raises(InputError, match="NaFlex"):
        read_bundle_info(tmp_path)  # as --model PATH: its model type names the siglip2: prefix


def test_training_hooks_of_the_pair_towers(tiny_pairs):
    """top:N, LoRA and grad checkpointing see the towers' layers and attention projections."""
    from mmretrieve.encoders import create_encoder

    for kind, targets in (("clip", "q_proj"), ("chinese-clip", "query")):
        for name in ("hf-pair-text", "hf-pair-image"):
            encoder = create_encoder(name, checkpoint=str(tiny_pairs[kind]))
            groups = encoder.layer_groups()
            assert len(groups) in (3, 4) and all(groups)  # embeddings, 2 layers, [final norm / pooling head]
            assert all(n.split(".")[3] == str(i) for i, group in enumerate(groups[1:3]) for n in group)
            names = {n for n, _ in encoder.module.named_parameters()}
            assert set().union(*map(set, groups)) == names
            modules = [n for n, _ in encoder.module.named_modules()]
            assert any(n.endswith(t) for n in modules for t in encoder.lora_targets)
            encoder.enable_grad_checkpointing()
        assert any(n.endswith(targets) for n, _ in create_encoder("hf-pair-text", checkpoint=str(tiny_pairs[kind]))
                   .module.named_modules())


def test_concurrent_first_uses_build_the_bundle_once(tiny_pairs, tmp_path, monkeypatch):
    """Two first uses at once: one builds, the other waits for it and reuses the bundle."""
    import threading

    from mmretrieve.bundle import read_bundle_info, resolve_model
    from mmretrieve.pairs import hf

    checkpoint = shutil.copytree(tiny_pairs["clip"], tmp_path / "ckpt")
    builds = []
    real = hf.pair_parts
    monkeypatch.setattr(hf, "pair_parts", lambda *a: builds.append(a) or real(*a))
    found = []
    threads = [threading.Thread(target=lambda: found.append(resolve_model(f"clip:local-dir:{checkpoint}")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 2 and found[0] == found[1] and len(builds) == 1
    read_bundle_info(found[0], verify=True)  # complete, every file matching its hash


def test_preprocess_files_from_before_the_new_fields_load_unchanged(tmp_path):
    """image_preprocess.json without resize/crop_offset and text_preprocess.json without
    padding/pad_token (every bundle saved before pairs) mean what they meant."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from mmretrieve.preprocess import ImagePreprocessor, TextPreprocessor

    (tmp_path / "image_preprocess.json").write_text(json.dumps(
        {"size": 24, "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}))
    image = ImagePreprocessor.load(tmp_path)
    assert (image.config.resize, image.config.crop_offset) == ("crop", "round")
    picture = random_image(7, (91, 40))  # odd margins, where round and floor differ
    assert image([picture])["pixel_values"].shape == (1, 3, 24, 24)
    scale = int(24 / 0.875)
    width = int(scale * 91 / 40)
    left, top = int(round((width - 24) / 2.0)), int(round((scale - 24) / 2.0))  # torchvision's, not floor
    expected = np.asarray(picture.resize((width, scale), Image.Resampling.BICUBIC).crop((left, top, left + 24,
                                                                                          top + 24)),
                          dtype=np.float32).transpose(2, 0, 1) / 255.0
    assert np.array_equal(image([picture])["pixel_values"][0], (expected - 0.5) / 0.25)
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"<pad>": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "text_preprocess.json").write_text(json.dumps({"max_length": 8, "extra": {}}))
    text = TextPreprocessor.load(tmp_path)
    assert (text.config.padding, text.config.pad_token) == ("longest", None)
    assert text(["a", "a b"])["input_ids"].tolist() == [[2, 0], [2, 3]]  # to the longest, with <pad>


def test_a_model_prefix_is_a_plugin_contract(tmp_path, monkeypatch):
    """Any plugin's ModelSpec prefix: `mine:REST` calls factory(REST), a bare name factory(); the
    folder of `mine:local-dir:PATH` is made absolute for the index manifest, and an index's recorded
    prefixed reference resolves again; a malformed prefix is refused at registration."""
    from mmretrieve import hookimpl, plugins
    from mmretrieve.bundle import absolute_ref, resolve_model, resolve_model_ref
    from mmretrieve.errors import RegistrationError
    from mmretrieve.specs import ModelSpec

    calls = []

    def factory(rest=None):
        calls.append(rest)
        return tmp_path

    class Mine:
        @hookimpl
        def register_models(self, register):
            register(ModelSpec(name="mine", prefixes=("mine:",), factory=factory))

    plugins.get_host().register(Mine(), "mine-plugin")
    assert resolve_model("mine:some/checkpoint") == tmp_path and resolve_model("mine") == tmp_path
    assert calls == ["some/checkpoint", None]
    monkeypatch.chdir(tmp_path)
    assert absolute_ref("mine:local-dir:ckpt") == f"mine:local-dir:{tmp_path / 'ckpt'}"
    assert absolute_ref("unknown:local-dir:ckpt") == "unknown:local-dir:ckpt"
    assert resolve_model_ref(built_with={"ref": "mine:some/checkpoint", "path": "/gone"}) == "mine:some/checkpoint"
    with pytest.raises(RegistrationError, match="must be a word ending in ':'"):
        ModelSpec(name="bad", prefixes=("bad",), factory=factory).validate()


def test_a_checkpoint_folder_without_weights_is_one_sentence(tiny_pairs, tmp_path):
    from mmretrieve.bundle import resolve_model
    from mmretrieve.errors import InputError

    checkpoint = shutil.copytree(tiny_pairs["clip"], tmp_path / "ckpt")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(InputError, match="cannot load the checkpoint in"):
        resolve_model(checkpoint)


def test_a_relative_checkpoint_folder_is_recorded_absolute(tiny_pairs, tmp_path, monkeypatch):
    """`--model clip:./ckpt` must still mean that folder to a search started elsewhere (the ref is
    what an index manifest records)."""
    from mmretrieve.bundle import absolute_ref, read_bundle_info

    folder = Path(tiny_pairs["clip"])
    monkeypatch.chdir(folder.parent)
    ref = absolute_ref(f"clip:./{folder.name}")
    assert ref == f"clip:{folder.resolve()}"
    monkeypatch.chdir(tmp_path)
    assert read_bundle_info(ref).fingerprint == read_bundle_info(f"clip:local-dir:{folder}").fingerprint
