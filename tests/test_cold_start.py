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
    """Record the folders scanned; the plugin "good" is installed in a folder of its own, first on sys.path."""
    home = tmp_path / "home"
    entry_file = home / "good_dist-1.2.dist-info" / "entry_points.txt"
    entry_file.parent.mkdir(parents=True)
    entry_file.write_text("[mmretrieve]\ngood = plugin_fixtures\n")
    monkeypatch.syspath_prepend(str(home))
    scanned = []
    good = plugins.FoundEntryPoint("good", "plugin_fixtures", "good-dist", "1.2", str(entry_file))

    def scan_folder(folder):
        scanned.append(folder)
        return [good] if folder == str(home) else []

    def scan_all():
        scanned.append("every distribution")
        return [good]

    monkeypatch.setattr(plugins, "_scan_folder", scan_folder)
    monkeypatch.setattr(plugins, "_scan_entry_points", scan_all)
    return scanned, entry_file, home


def test_entry_points_are_found_once_and_then_read_from_the_cache(cache_home, scans):
    scanned, _, home = scans
    first = plugins.discover_entry_points()
    assert str(home) in scanned and cache_home.is_file()
    scanned.clear()
    again = plugins.discover_entry_points()
    assert scanned == []  # no scan: the cache answered
    assert again == first and [e.name for e in again] == ["good"]
    assert again[0].load() is __import__("plugin_fixtures")
    host = plugins.PluginHost()
    host.load_entry_points(cached=True)
    assert host.records["good"].error is None and host.records["good"].distribution == "good-dist"


def test_the_cache_is_voided_by_an_install_or_a_changed_entry_point_file(cache_home, scans, tmp_path, monkeypatch):
    scanned, entry_file, home = scans
    plugins.discover_entry_points()
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))  # a new search path entry: only it is scanned
    scanned.clear()
    plugins.discover_entry_points()
    assert scanned == [str(site)]
    (site / "notes.txt").write_text("a working folder changes all the time")
    os.utime(site, ns=(1, 1))
    scanned.clear()
    plugins.discover_entry_points()
    assert scanned == []  # the same distributions there: nothing to scan
    (site / "new_dist-1.0.dist-info").mkdir()  # an install
    os.utime(site, ns=(2, 2))
    plugins.discover_entry_points()
    assert scanned == [str(site)]
    plugins.discover_entry_points()
    assert scanned == [str(site)]
    entry_file.write_text("[mmretrieve]\ngood = plugin_fixtures\nother = x\n")
    os.utime(entry_file, ns=(5, 5))
    plugins.discover_entry_points()
    assert scanned == [str(site), str(home)]


def test_a_damaged_or_disabled_cache_only_costs_a_scan(cache_home, scans, monkeypatch):
    scanned, _, home = scans
    cache_home.parent.mkdir(parents=True)
    now = os.stat(home).st_mtime_ns
    for damage in ("not json", json.dumps([1, 2]), json.dumps({"folders": {str(home): {"mtime": 1}}}),
                   json.dumps({"folders": {str(home): {"mtime": now, "installed": 3, "entry_points": 3}}}),
                   json.dumps({"folders": {str(home): {"mtime": now, "installed": [[1]],
                                                       "entry_points": [{"metadata_file": None}]}}})):
        cache_home.write_text(damage)
        scanned.clear()
        assert [e.name for e in plugins.discover_entry_points()] == ["good"] and str(home) in scanned
    monkeypatch.setenv(plugins.ENV_CACHE, "0")
    scanned.clear()
    plugins.discover_entry_points()
    plugins.discover_entry_points()
    assert scanned == ["every distribution"] * 2


def test_cached_entry_points_are_the_ones_importlib_metadata_finds(cache_home, tmp_path, monkeypatch):
    """The first folder on sys.path that holds a distribution decides its entry points, as in importlib.metadata."""
    for folder, names in (("first", ["early"]), ("second", ["late", "other"])):
        info = tmp_path / folder / "Good.Dist-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: Good.Dist\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text("[mmretrieve]\n" + "".join(f"{n} = plugin_fixtures\n" for n in names))
    monkeypatch.syspath_prepend(str(tmp_path / "second"))
    monkeypatch.syspath_prepend(str(tmp_path / "first"))

    def found():
        return sorted((e.name, e.value, e.distribution, e.version, e.metadata_file)
                      for e in plugins.discover_entry_points())

    expected = sorted((e.name, e.value, e.distribution, e.version, e.metadata_file) for e in plugins._scan_entry_points())
    assert found() == expected and found() == expected  # scanned folder by folder, then read from the cache
    assert "early" in {row[0] for row in expected} and not {"late", "other"} & {row[0] for row in expected}


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
