"""What a command loads before it answers: the entry-point cache, one tower for one modality,
no index builder for a search, and glibc's allocator tuning for torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import numpy as np
import pytest

from mmretrieve import plugins


@pytest.fixture
def tiny_bundle(tiny_model, tmp_path):
    from mmretrieve.bundle import save_bundle

    return save_bundle(tiny_model, tmp_path / "bundle").path


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(plugins.ENV_CACHE, "1")
    return tmp_path / "cache" / "mmretrieve" / plugins.CACHE_FILE


@pytest.fixture
def scans(monkeypatch, tmp_path):
    """Count full scans; each finds one plugin whose entry_points.txt lives in tmp_path."""
    counted = []
    entry_file = tmp_path / "entry_points.txt"
    entry_file.write_text("[mmretrieve]\ngood = plugin_fixtures\n")

    def scan():
        counted.append(1)
        return [plugins.FoundEntryPoint("good", "plugin_fixtures", "good-dist", "1.2", str(entry_file))]

    monkeypatch.setattr(plugins, "_scan_entry_points", scan)
    return counted, entry_file


def test_entry_points_are_found_once_and_then_read_from_the_cache(cache_home, scans):
    counted, _ = scans
    first = plugins.discover_entry_points()
    assert len(counted) == 1 and cache_home.is_file()
    again = plugins.discover_entry_points()
    assert len(counted) == 1  # no scan: the cache answered
    assert again == first
    assert again[0].load() is __import__("plugin_fixtures")
    host = plugins.PluginHost()
    host.load_entry_points(cached=True)
    assert host.records["good"].error is None and host.records["good"].distribution == "good-dist"


def test_the_cache_is_voided_by_an_install_or_a_changed_entry_point_file(cache_home, scans, tmp_path, monkeypatch):
    counted, entry_file = scans
    plugins.discover_entry_points()
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))  # a new search path entry
    plugins.discover_entry_points()
    assert len(counted) == 2
    (site / "new_dist-1.0.dist-info").mkdir()  # an install changes the folder's time
    os.utime(site, ns=(1, 1))
    plugins.discover_entry_points()
    assert len(counted) == 3
    plugins.discover_entry_points()
    assert len(counted) == 3
    entry_file.write_text("[mmretrieve]\ngood = plugin_fixtures\nother = x\n")
    os.utime(entry_file, ns=(5, 5))
    plugins.discover_entry_points()
    assert len(counted) == 4


def test_a_damaged_or_disabled_cache_only_costs_a_scan(cache_home, scans, monkeypatch):
    counted, _ = scans
    cache_home.parent.mkdir(parents=True)
    for damage in ("not json", json.dumps([1, 2]), json.dumps({"entries": [{"key": 1, "entry_points": 3}]})):
        cache_home.write_text(damage)
        assert [e.name for e in plugins.discover_entry_points()] == ["good"]
    monkeypatch.setenv(plugins.ENV_CACHE, "0")
    before = len(counted)
    plugins.discover_entry_points()
    plugins.discover_entry_points()
    assert len(counted) == before + 2


def test_a_search_imports_neither_the_index_builder_nor_multiprocessing(tmp_path):
    code = ("import sys, mmretrieve.api, mmretrieve.cli, mmretrieve.plugins as p\n"
            "p.get_host(); p.reset_host(); p.get_host()\n"  # the second host reads the cache
            "print(sorted(m for m in ('mmretrieve.index.builder', 'multiprocessing', 'torch', 'importlib.metadata')"
            " if m in sys.modules))")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), plugins.ENV_CACHE: "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "['importlib.metadata']"  # the first host scanned; nothing else came
    code = code.replace("p.get_host(); p.reset_host(); p.get_host()", "p.get_host()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "[]"  # entry points from the cache: no distribution scanned


def test_torch_runtime_builds_only_the_tower_it_uses(tiny_bundle):
    from mmretrieve.bundle import load_bundle
    from mmretrieve.runtime.torch_runtime import TorchEmbedder

    embedder = TorchEmbedder(str(tiny_bundle), device="cpu")
    texts = embedder.embed_texts(["a dog", "two cats on a mat"])
    assert set(embedder._towers) == {"text"}  # the image network was never built
    import torch

    model = load_bundle(tiny_bundle).eval()
    with torch.inference_mode():
        expected = model.encode_text({k: torch.from_numpy(v) for k, v in embedder.text_preprocessor(
            ["a dog", "two cats on a mat"]).items()}).numpy()
        pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
        expected_images = model.encode_image({"pixel_values": torch.from_numpy(pixels)}).numpy()
    np.testing.assert_allclose(texts, expected, atol=1e-5)
    np.testing.assert_allclose(embedder.embed_pixels(pixels), expected_images, atol=1e-5)
    assert set(embedder._towers) == {"text", "image"}


def test_a_tower_whose_weights_do_not_fit_is_refused(tiny_bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    from mmretrieve.bundle import WEIGHTS, load_tower, read_bundle_info
    from mmretrieve.errors import BundleError

    state = load_file(str(tiny_bundle / WEIGHTS))
    save_file({k: v for k, v in state.items() if not k.startswith("text_head.")}, str(tiny_bundle / WEIGHTS))
    info = read_bundle_info(tiny_bundle)  # not re-hashed: the fit check is what is tested
    with pytest.raises(BundleError, match="weights do not fit"):
        load_tower(info, "text")
    load_tower(info, "image")  # the other tower's weights are all there


def test_allocator_tuning_is_skipped_when_the_user_chose(monkeypatch):
    from mmretrieve import allocator

    for env in ({"MALLOC_TOP_PAD_": "1"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
                {allocator.TUNING_ENV: "0"}):
        monkeypatch.setattr(allocator, "_tuned", None)
        assert allocator.tune_allocator(env) is False
    monkeypatch.setattr(allocator, "_tuned", None)
    assert allocator.tune_allocator({}) is (allocator.glibc() is not None)
