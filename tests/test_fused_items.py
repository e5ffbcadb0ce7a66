"""Multimodal items end to end on a tiny real model: train-fusion, eval --fused, index --fusion
(incremental, caption changes, settings checked), search, and export carrying the heads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mmretrieve.cli import cli

pytestmark = pytest.mark.slow

STRATEGIES = ("late", "mean", "concat-projection", "gated")


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def fused_rows(with_trained_heads: bool) -> list[str]:
    """The rows `eval --fused` reports: both single modalities, then every registered strategy, a
    third-party one installed in this environment included (untrained first, then by name); the
    trained ones only when the model holds their heads."""
    from mmretrieve.plugins import get_host

    registry = get_host().registry("fusion")
    names = sorted(registry.names(), key=lambda name: (registry.get(name).trainable, name))
    assert set(STRATEGIES) <= set(names)
    return ["image-only", "text-only", *(n for n in names if with_trained_heads or not registry.get(n).trainable)]


@pytest.fixture
def captioned(tmp_path, tiny_model):
    """A tiny model bundle and a captioned colour set: 7 colours x 3 images, 3 captions each."""
    from mmretrieve.bundle import save_bundle
    from tiny_models import make_colour_dataset

    bundle = save_bundle(tiny_model, tmp_path / "model").path
    data = make_colour_dataset(tmp_path / "set", per_colour=3, size=40)
    return bundle, data


def test_train_fusion_stores_heads_in_the_bundle_and_eval_fused_reports_every_strategy(captioned, tmp_path):
    bundle, data = captioned
    out = run("train-fusion", "--model", bundle, "--data", data, "--epochs", "2", "--batch-size", "4",
              "--cache", tmp_path / "cache", "--workers", "0").output
    for name in ("concat-projection", "gated"):
        assert f"{name}: " in out and (bundle / "fusion" / name / "fusion.onnx").is_file()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # image and text features, reused next time
    described = run("info", bundle, "--verify").output
    assert "fusion head:  gated (" in described and "2 fusion heads too" in described

    table = json.loads(run("eval", "--fused", "--model", bundle, "--data", data, "--json", "--workers", "0").stdout)
    assert list(table) == fused_rows(with_trained_heads=True)
    for row in table.values():
        assert 0 <= row["R@1"] <= row["R@5"] <= row["R@10"] <= 100
    printed = run("eval", "--fused", "--model", bundle, "--data", data, "--weights", "1,0", "--workers", "0").output
    assert "| mean |" in printed and "caption queries" in printed
    text_only = json.loads(run("eval", "--fused", "--model", bundle, "--data", data, "--weights", "1,0", "--json",
                               "--workers", "0").stdout)
    assert text_only["mean"] == text_only["text-only"]  # all weight on the caption: the text-only ranking


def test_eval_fused_without_heads_leaves_the_trained_strategies_out_and_says_so(captioned):
    bundle, data = captioned
    result = CliRunner().invoke(cli, ["eval", "--fused", "--model", str(bundle), "--data", str(data), "--json",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    rows = list(json.loads(result.stdout))
    assert rows == fused_rows(with_trained_heads=False)
    assert {"late", "mean"} <= set(rows) and not {"concat-projection", "gated"} & set(rows)
    assert "left out: gated is a trained strategy" in result.stderr


def test_train_fusion_mistakes_are_one_sentence(captioned, tmp_path):
    bundle, data = captioned
    result = run("train-fusion", "--model", "default", "--data", data, ok=False)
    assert result.exit_code == 1 and "give --out DIR" in result.output
    result = run("train-fusion", "--model", bundle, "--data", data, "--strategy", "mean", ok=False)
    assert result.exit_code == 1 and "mean has nothing to train" in result.output
    result = run("eval", "--model", bundle, "--data", data, "--weights", "1,1", ok=False)
    assert result.exit_code == 2 and "go with --fused" in result.output


def index_args(bundle, data, *extra):
    return ["index", data.parent / "images", "--model", bundle, "--captions", data, "--workers", "0", "--json", *extra]


def test_a_fused_index_holds_image_plus_caption_items(captioned, tmp_path):
    from mmretrieve.fusion.items import fuse_items
    from mmretrieve.fusion.resolve import resolve_fusion
    from mmretrieve.index.store import IndexStore
    from mmretrieve.runtime import load_embedder

    bundle, data = captioned
    folder = tmp_path / "fused"
    report = json.loads(run(*index_args(bundle, data, "--fusion", "mean", "--weights", "1,3",
                                        "--index-dir", folder)).stdout)
    assert report["added"] == 21 and report["uncaptioned"] == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["fusion"] == {"strategy": "mean", "weights": [0.25, 0.75], "head_digest": None}
    assert manifest["captions"] == str(data.resolve())
    # Each stored vector is the image fused with its first caption, as the strategy computes it.
    embedder = load_embedder(str(bundle))
    store = IndexStore.open(folder)
    ids, vectors = store.all_embeddings()
    items = store.items_by_id(ids)
    first = items[int(ids[0])]
    expected = fuse_items(resolve_fusion(embedder, "mean", "1,3"), embedder.embed_texts([first.captions[0]]),
                          embedder.embed_images([first.path]))
    np.testing.assert_allclose(vectors[0], expected[0], atol=1e-5)
    store.close()
    # A caption query finds items; the index answers like any other.
    hits = json.loads(run("search", "a red thing", "--index-dir", folder, "--json", "-k", "3").stdout)
    assert len(hits) == 3 and all("captions" in hit for hit in hits)


def test_a_fused_index_updates_incrementally_and_re_embeds_a_changed_caption(captioned, tmp_path):
    bundle, data = captioned
    folder = tmp_path / "fused"
    run(*index_args(bundle, data, "--fusion", "late", "--index-dir", folder))
    # Without --fusion or --captions the index keeps its own settings.
    again = json.loads(run("index", data.parent / "images", "--index-dir", folder, "--workers", "0", "--json").stdout)
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, 21)
    lines = data.read_text().splitlines()
    record = json.loads(lines[0])
    record["captions"][0] = "a completely different caption"
    lines[0] = json.dumps(record)
    del lines[1]  # this image loses its captions: indexed by the image alone
    data.write_text("\n".join(lines) + "\n")
    changed = json.loads(run("index", data.parent / "images", "--index-dir", folder, "--workers", "0",
                             "--json").stdout)
    assert (changed["updated"], changed["unchanged"], changed["uncaptioned"]) == (2, 19, 1)
    from mmretrieve.index.store import IndexStore

    store = IndexStore.open(folder)
    stored = store.captions_by_path()
    store.close()
    assert stored[str((data.parent / record["image"]).resolve())][0] == "a completely different caption"


def test_fusion_settings_are_checked_against_the_index(captioned, tmp_path):
    bundle, data = captioned
    folder = tmp_path / "fused"
    run(*index_args(bundle, data, "--fusion", "mean", "--index-dir", folder))
    other = run(*index_args(bundle, data, "--fusion", "mean", "--weights", "0.2,0.8", "--index-dir", folder), ok=False)
    assert other.exit_code == 1 and "holds items fused with mean (weights 0.5, 0.5)" in other.output
    assert "--rebuild" in other.output and len(other.output.strip().splitlines()) == 1
    rebuilt = json.loads(run(*index_args(bundle, data, "--fusion", "mean", "--weights", "0.2,0.8", "--rebuild",
                                         "--index-dir", folder)).stdout)
    assert rebuilt["added"] == 21
    plain = tmp_path / "plain"
    run("index", data.parent / "images", "--model", bundle, "--index-dir", plain, "--workers", "0")
    mixed = run(*index_args(bundle, data, "--fusion", "mean", "--index-dir", plain), ok=False)
    assert mixed.exit_code == 1 and "holds images only" in mixed.output
    no_captions = run("index", data.parent / "images", "--model", bundle, "--fusion", "mean", "--index-dir",
                      tmp_path / "new", ok=False)
    assert no_captions.exit_code == 1 and "give --captions FILE" in no_captions.output
    no_head = run(*index_args(bundle, data, "--fusion", "gated", "--index-dir", tmp_path / "g"), ok=False)
    assert no_head.exit_code == 1 and "has no gated head" in no_head.output
    texts = run("index", "--texts", data, "--fusion", "mean", ok=False)
    assert texts.exit_code == 2


def test_a_plain_index_updates_changed_captions_without_re_embedding(captioned, tmp_path):
    bundle, data = captioned
    folder = tmp_path / "plain"
    run("index", data.parent / "images", "--model", bundle, "--captions", data, "--index-dir", folder, "--workers", "0")
    lines = data.read_text().splitlines()
    record = json.loads(lines[0])
    record["captions"] = ["a new title"]
    data.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    report = json.loads(run("index", data.parent / "images", "--captions", data, "--index-dir", folder,
                            "--workers", "0", "--json").stdout)
    assert (report["updated"], report["unchanged"]) == (0, 21)
    hits = json.loads(run("search", "--image", data.parent / record["image"], "--index-dir", folder, "-k", "1",
                          "--json").stdout)
    assert hits[0]["captions"] == ["a new title"]


@pytest.mark.onnx
def test_a_trained_head_indexes_and_searches_the_same_under_torch_and_its_onnx_export(captioned, tmp_path):
    bundle, data = captioned
    run("train-fusion", "--model", bundle, "--data", data, "--strategy", "gated", "--epochs", "2",
        "--batch-size", "4", "--workers", "0")
    export = tmp_path / "export"
    exported = run("export", "--model", bundle, "--out", export).output
    assert "fusion head gated: ONNX vs PyTorch min cosine" in exported
    assert (export / "fusion" / "gated" / "fusion.onnx").is_file()
    described = run("info", export, "--verify").output
    assert "fusion head:  gated (" in described and "precision: fp32" in described and "files match" in described
    folder = tmp_path / "fused"
    run(*index_args(bundle, data, "--fusion", "gated", "--index-dir", folder))
    assert "fusion:       items fused with gated (head " in run("info", folder).output
    query = ["search", "a blue thing", "--index-dir", folder, "--json", "-k", "5"]
    by_torch = json.loads(run(*query).stdout)
    by_onnx = json.loads(run(*query, "--model", export).stdout)
    assert [h["path"] for h in by_onnx] == [h["path"] for h in by_torch]
    np.testing.assert_allclose([h["score"] for h in by_onnx], [h["score"] for h in by_torch], atol=1e-4)
    # The export updates the index the bundle built (same fingerprint, same head digest), without torch.
    shutil.copy(data.parent / "images" / "red_0.png", data.parent / "images" / "red_copy.png")
    code = ("import json, sys; from mmretrieve.cli import main; sys.argv = ['mmretrieve', 'index', sys.argv[1], "
            "'--model', sys.argv[2], '--index-dir', sys.argv[3], '--workers', '0', '--json']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(json.dumps([m for m in ('torch', 'transformers', 'timm') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code, str(data.parent / "images"), str(export), str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *report_lines, imported_line = done.stdout.strip().splitlines()
    report, imported = json.loads("\n".join(report_lines)), json.loads(imported_line)
    assert report["added"] == 1 and report["uncaptioned"] == 1 and imported == []
    fused_query = run("search", "--image", data.parent / "images" / "red_0.png", "--text", "at night", "--fusion",
                      "gated", "--index-dir", folder, "--json", "-k", "2").stdout
    assert len(json.loads(fused_query)) == 2
    (export / "fusion" / "gated" / "fusion.onnx").write_bytes(b"damaged")
    damaged = run("info", export, ok=False)
    assert damaged.exit_code == 1 and "fusion.onnx does not match its recorded hash" in damaged.output


def test_late_fused_items_score_exactly_the_weighted_similarities(captioned, tmp_path):
    from mmretrieve.data import load_captions
    from mmretrieve.runtime import load_embedder

    bundle, data = captioned
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:]) + "\n")  # the first image has no caption now
    folder = tmp_path / "late"
    report = json.loads(run(*index_args(bundle, data, "--fusion", "late", "--weights", "1,3",
                                        "--index-dir", folder)).stdout)
    assert report["uncaptioned"] == 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["query_padding"] == 1 and manifest["embed_dim"] == load_embedder(str(bundle)).embed_dim + 1
    hits = json.loads(run("search", "a red thing", "--index-dir", folder, "--json", "-k", "50").stdout)
    embedder = load_embedder(str(bundle))
    query = embedder.embed_texts(["a red thing"])[0]
    first_caption = {str(i.image.resolve()): i.captions[0] for i in load_captions(data, check_images=False).items}
    assert len(hits) == 21
    for hit in hits:
        expected = 0.75 * float(embedder.embed_images([hit["path"]])[0] @ query)
        if hit["path"] in first_caption:
            expected += 0.25 * float(embedder.embed_texts([first_caption[hit["path"]]])[0] @ query)
        assert hit["score"] == pytest.approx(expected, abs=1e-4)


def test_a_fused_index_remembers_the_captions_file_it_was_last_given(captioned, tmp_path):
    bundle, data = captioned
    folder = tmp_path / "fused"
    run(*index_args(bundle, data, "--fusion", "mean", "--index-dir", folder))
    renamed = data.parent / "titles.jsonl"  # beside the images its relative paths name
    record, *rest = data.read_text().splitlines()
    changed = json.loads(record)
    changed["captions"] = ["a title that changed"]
    renamed.write_text("\n".join([json.dumps(changed), *rest]) + "\n")
    data.unlink()
    gone = run("index", data.parent / "images", "--index-dir", folder, "--workers", "0", ok=False)
    assert gone.exit_code == 1 and "which is gone; give --captions FILE" in gone.output
    moved = json.loads(run("index", data.parent / "images", "--captions", renamed, "--index-dir", folder,
                           "--workers", "0", "--json").stdout)
    assert moved["updated"] == 1
    assert json.loads((folder / "manifest.json").read_text())["captions"] == str(renamed.resolve())
    again = json.loads(run("index", data.parent / "images", "--index-dir", folder, "--workers", "0", "--json").stdout)
    assert (again["updated"], again["unchanged"]) == (0, 21)


def test_a_third_party_strategy_indexes_and_evaluates_like_a_builtin(captioned, tmp_path):
    from mmretrieve.index.store import IndexStore
    from mmretrieve.plugins import get_host
    from mmretrieve.runtime import load_embedder
    from plugin_fixtures import FusionPlugin, LouderModality

    get_host().register(FusionPlugin(), name="louder-plugin")
    bundle, data = captioned
    table = json.loads(run("eval", "--fused", "--model", bundle, "--data", data, "--json", "--workers", "0").stdout)
    assert "louder" in table and 0 <= table["louder"]["R@1"] <= table["louder"]["R@10"] <= 100
    folder = tmp_path / "louder"
    run(*index_args(bundle, data, "--fusion", "louder", "--index-dir", folder))
    store = IndexStore.open(folder)
    ids, vectors = store.all_embeddings()
    item = store.items_by_id(ids[:1])[int(ids[0])]
    store.close()
    embedder = load_embedder(str(bundle))
    expected = LouderModality().fuse(embedder.embed_texts([item.captions[0]]), embedder.embed_images([item.path]))
    np.testing.assert_allclose(vectors[0], expected[0], atol=1e-5)


def test_a_killed_fused_run_resumes_and_keeps_what_it_staged(captioned, tmp_path, monkeypatch):
    import mmretrieve.api as mm
    from mmretrieve.index.search import IndexReader
    from mmretrieve.runtime import load_embedder

    bundle, data = captioned
    folder = tmp_path / "fused"
    embedder = load_embedder(str(bundle))
    original = embedder.embed_pixels
    calls = {"n": 0}

    def dies_on_third_batch(pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(pixels)

    monkeypatch.setattr("mmretrieve.runtime.load_embedder", lambda *a, **k: embedder)
    monkeypatch.setattr(embedder, "embed_pixels", dies_on_third_batch)
    options = dict(index_dir=folder, captions=data, fusion="mean", workers=0, batch_size=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        mm.build_index(data.parent / "images", str(bundle), **options)
    embedded = []
    monkeypatch.setattr(embedder, "embed_pixels", lambda p: embedded.append(len(p)) or original(p))
    index = mm.build_index(data.parent / "images", str(bundle), **options)
    assert len(index) == 21 and sum(embedded) == 21 - 8  # the two batches staged before the kill were kept
    reader = IndexReader(folder, embedder=embedder)
    assert json.loads((folder / "manifest.json").read_text())["fusion"]["strategy"] == "mean"
    assert len(reader.search_text(["a red thing"], k=30)[0]) == 21


def test_a_late_strategy_without_weights_is_evaluated_but_never_indexed_or_searched(captioned, tmp_path):
    from mmretrieve.plugins import get_host
    from plugin_fixtures import FusionPlugin

    get_host().register(FusionPlugin(), name="fusion-plugin")
    bundle, data = captioned
    table = json.loads(run("eval", "--fused", "--model", bundle, "--data", data, "--json", "--workers", "0").stdout)
    assert "best-of-both" in table
    refused = run(*index_args(bundle, data, "--fusion", "best-of-both", "--index-dir", tmp_path / "idx"), ok=False)
    assert refused.exit_code == 1 and "one vector per item or query cannot hold" in refused.output
    assert not (tmp_path / "idx" / "manifest.json").exists()  # refused before the index was created
    run(*index_args(bundle, data, "--index-dir", tmp_path / "plain"))
    query = run("search", "--image", data.parent / "images" / "red_0.png", "--text", "at night", "--fusion",
                "best-of-both", "--index-dir", tmp_path / "plain", ok=False)
    assert query.exit_code == 1 and "one vector per item or query cannot hold" in query.output
