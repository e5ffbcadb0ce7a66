"""Cached augmented views (``image_views``): several views per training image, computed once by the
frozen image tower; one view drawn per image per epoch, the same on resume."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmretrieve.augment import ViewAugmentation, augment, crop_box, view_pixels, view_rng
from mmretrieve.config import ModelConfig, TowerConfig, TowerTraining, TrainConfig
from mmretrieve.errors import ConfigError
from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor
from mmretrieve.train.loop import Trainer, run_training
from mmretrieve.train.pipeline import EpochBatches
from tiny_models import TINY_TIMM, make_colour_dataset, model_state, tiny_train_config


def gradient_image(width: int = 120, height: int = 90) -> Image.Image:
    """Every pixel different, so any change of crop or a flip changes the output."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8))


# -- the augmentation ---------------------------------------------------------------------------

def test_crops_stay_inside_the_image_within_the_settings_area_and_aspect():
    settings = ViewAugmentation(scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3))
    areas, aspects = [], []
    for view in range(300):
        left, top, right, bottom = crop_box(400, 300, settings, view_rng("ab" * 32, view))
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        areas.append((right - left) * (bottom - top) / (400 * 300))
        aspects.append((right - left) / (bottom - top))
    assert 0.59 <= min(areas) and max(areas) <= 1.0 and max(areas) - min(areas) > 0.3
    assert 3 / 4 - 0.02 <= min(aspects) and max(aspects) <= 4 / 3 + 0.02 and max(aspects) - min(aspects) > 0.3
    # An image far longer than the ratio allows: the largest centred crop of an allowed shape.
    assert crop_box(1000, 100, settings, view_rng("cd" * 32, 1)) == (433, 0, 566, 100)


def test_view_zero_is_the_plain_preprocessing_and_views_are_reproducible_per_image_and_view():
    preprocessor = ImagePreprocessor(ImagePreprocessConfig(size=32))
    image, settings = gradient_image(), ViewAugmentation()
    views = view_pixels(image, "12" * 32, 4, preprocessor, settings)
    assert views.shape == (4, 32, 32, 3) and views.dtype == np.uint8
    assert np.array_equal(views[0], preprocessor.resize_crop(image))
    assert all(not np.array_equal(views[0], views[k]) for k in (1, 2, 3))
    assert len({views[k].tobytes() for k in range(4)}) == 4
    # The same image and view give the same pixels; view k does not depend on how many views there are.
    assert np.array_equal(view_pixels(image, "12" * 32, 4, preprocessor, settings), views)
    assert np.array_equal(view_pixels(image, "12" * 32, 2, preprocessor, settings), views[:2])
    # Another image (another file hash) gets other crops.
    assert not np.array_equal(view_pixels(image, "34" * 32, 2, preprocessor, settings)[1], views[1])


def test_views_of_a_preprocessor_with_only_transform_are_its_output():
    # A runtime's own preprocessor may offer only ``transform`` (decode_one accepts it too).
    class TransformOnly:
        def __init__(self):
            self.plain = ImagePreprocessor(ImagePreprocessConfig(size=32))

        def transform(self, image):
            return self.plain.normalize(self.plain.resize_crop(image)[None])[0]

    image, settings, only = gradient_image(), ViewAugmentation(), TransformOnly()
    views = view_pixels(image, "12" * 32, 3, only, settings)
    plain = view_pixels(image, "12" * 32, 3, only.plain, settings)
    np.testing.assert_allclose(views, only.plain.normalize(plain))


def test_flip_mirrors_without_changing_the_crop():
    image = gradient_image()
    flipped = [augment(image, ViewAugmentation(flip=True), view_rng("56" * 32, v)) for v in range(8)]
    plain = [augment(image, ViewAugmentation(flip=False), view_rng("56" * 32, v)) for v in range(8)]
    mirrored = 0
    for a, b in zip(flipped, plain):
        same = np.array_equal(np.asarray(a), np.asarray(b))
        mirror = np.array_equal(np.asarray(a), np.asarray(b)[:, ::-1])
        assert same or mirror
        mirrored += mirror and not same
    assert 0 < mirrored < 8


@pytest.mark.parametrize("settings, message", [
    (dict(scale=(0.0, 1.0)), "image_view_scale must be"),
    (dict(scale=(0.9, 0.5)), "image_view_scale must be"),
    (dict(scale=0.5), "image_view_scale must be"),
    (dict(ratio=(1.5, 1.0)), "image_view_ratio must be"),
    (dict(ratio=(1.0, 2.0, 3.0)), "image_view_ratio must be"),
])
def test_bad_augmentation_settings_are_one_sentence(settings, message):
    with pytest.raises(ConfigError, match=message):
        ViewAugmentation(**settings)


def test_a_plain_cache_of_the_same_images_is_view_zero_and_only_augmented_views_are_computed(tmp_path, colour_data):
    from mmretrieve.bundle import tower_fingerprint
    from mmretrieve.data import load_captions
    from mmretrieve.embedding import cached_tower_features, cached_view_features, tower_cache_path
    from mmretrieve.encoders.factory import create_encoder

    encoder = create_encoder(f"timm:{TINY_TIMM}", pretrained=False, image_size=48)
    paths = [item.image for item in load_captions(str(colour_data), progress=False).items[:10]]
    fingerprint, settings = tower_fingerprint(encoder), ViewAugmentation()

    def views(folder):
        return cached_view_features(encoder, paths, folder, 8, "cpu", "image-train", fingerprint, 3, settings).numpy()

    alone = views(tmp_path / "alone")
    plain = cached_tower_features(encoder, paths, tmp_path / "beside", 8, "cpu", "image-train", fingerprint)
    np.testing.assert_allclose(alone[:, 0], plain.numpy(), rtol=1e-5, atol=1e-6)
    # Mark the plain file, to see that view 0 is read from it rather than computed again.
    path = tower_cache_path(tmp_path / "beside", "image-train", fingerprint, paths)
    np.save(path, np.full((10, encoder.dim), 7.0, dtype=np.float32))
    beside = views(tmp_path / "beside")
    assert (beside[:, 0] == 7.0).all()
    np.testing.assert_allclose(beside[:, 1:], alone[:, 1:], rtol=1e-5, atol=1e-6)


# -- the sampler --------------------------------------------------------------------------------

def test_sampler_draws_a_view_per_image_each_epoch_without_changing_images_or_captions():
    counts = [5] * 40
    one, four = EpochBatches(counts, 8, seed=3), EpochBatches(counts, 8, seed=3, views=4)
    plans = {}
    for epoch in (0, 1):
        one.set_position(epoch, 0)
        four.set_position(epoch, 0)
        plain, viewed = list(one), list(four)
        assert all(len(pair) == 2 for batch in plain for pair in batch)
        assert [[pair[:2] for pair in batch] for batch in viewed] == plain
        plans[epoch] = {image: view for batch in viewed for image, _, view in batch}
        assert set(plans[epoch].values()) == {0, 1, 2, 3}
    assert plans[0] != plans[1], "the view of an image changes between epochs"
    # Resuming mid-epoch continues the same plan; another process (rank) shares it.
    four.set_position(1, 2)
    assert [{i: v for i, _, v in batch} for batch in four] == \
        [{i: plans[1][i] for i, _, _ in batch} for batch in viewed[2:]]
    other_rank = EpochBatches(counts, 4, seed=3, rank=1, world_size=2, views=4)
    other_rank.set_position(1, 0)
    assert all(plans[1][i] == v for batch in other_rank for i, _, v in batch)


# -- training -----------------------------------------------------------------------------------

def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_views_are_cached_once_and_view_zero_is_the_plain_feature(make_config, tmp_path, monkeypatch):
    run_training(make_config(image_views=3, epochs=1, output=str(tmp_path / "views")))
    cache = tmp_path / "views" / "cache"
    views_files = list(cache.glob("image-train-views3-*.npy"))
    assert len(views_files) == 1 and not list(cache.glob("*.tmp"))
    features = np.load(views_files[0])
    assert features.shape == (28, 3, 256)  # 28 training images x 3 views x the tiny tower's features
    assert not np.allclose(features[:, 0], features[:, 1]) and not np.allclose(features[:, 1], features[:, 2])
    # Validation keeps the plain features (no views), as indexing sees images.
    assert len(list(cache.glob("image-val-*.npy"))) == 1 and not list(cache.glob("image-val-views*"))
    # View 0 is what a one-view run caches.
    run_training(make_config(epochs=1, output=str(tmp_path / "plain")))
    (plain,) = (tmp_path / "plain" / "cache").glob("image-train-*.npy")
    np.testing.assert_allclose(features[:, 0], np.load(plain), rtol=1e-5, atol=1e-6)

    # A second start over the same cache decodes nothing.
    import mmretrieve.embedding as embedding

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(embedding, "decode_views", no_decoding)
    trainer = Trainer(make_config(image_views=3, epochs=2, output=str(tmp_path / "views")), resume=True)
    assert torch.equal(trainer.caches["image"].cpu(), torch.from_numpy(features))
    # Other augmentation settings are another cache entry: computed, not mistaken for this one.
    with pytest.raises(AssertionError, match="decoded again"):
        Trainer(make_config(image_views=3, image_view_flip=False, output=str(tmp_path / "flip")))


@pytest.mark.slow
def test_resume_with_views_continues_exactly_as_an_uninterrupted_run(make_config, tmp_path, monkeypatch):
    settings = dict(image_views=3, epochs=3, eval_every=100)
    run_training(make_config(output=str(tmp_path / "straight"), **settings))

    original_report = Trainer._report

    def interrupt_after_step_5(self, bar, window):
        original_report(self, bar, window)
        if self.state["step"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_report", interrupt_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_training(make_config(output=str(tmp_path / "killed"), **settings))
    monkeypatch.setattr(Trainer, "_report", original_report)
    resumed = Trainer(make_config(output=str(tmp_path / "killed"), **settings), resume=True).train()
    assert resumed.steps == 12
    assert_same_state(model_state(tmp_path / "straight"), model_state(tmp_path / "killed"))
    # The views were used: the plain run with the same seed ends elsewhere.
    run_training(make_config(output=str(tmp_path / "plain"), epochs=3, eval_every=100))
    plain = model_state(tmp_path / "plain")
    assert not torch.allclose(plain["image_head.weight"], model_state(tmp_path / "straight")["image_head.weight"])


@pytest.mark.slow
def test_views_identical_to_the_plain_image_train_exactly_as_one_view(make_config, tmp_path, colour_data):
    """With crops that keep the whole square image and no flip, every view is the plain one, so a
    run with 3 views must end where a one-view run does: the view choice leaves images, captions
    and order alone, and the cached path reads the right rows."""
    run_training(make_config(output=str(tmp_path / "one")))
    run_training(make_config(output=str(tmp_path / "three"), image_views=3, image_view_scale=[1.0, 1.0],
                             image_view_ratio=[1.0, 1.0], image_view_flip=False))
    (views,) = (tmp_path / "three" / "cache").glob("image-train-views3-*.npy")
    features = np.load(views)
    np.testing.assert_allclose(features[:, 1], features[:, 0], rtol=1e-5, atol=1e-6)
    assert_same_state(model_state(tmp_path / "one"), model_state(tmp_path / "three"))


@pytest.mark.slow
def test_one_view_is_todays_run(make_config, tmp_path):
    """image_views = 1 (the default): the cache holds the plain files only, batches carry no view,
    and the augmentation settings play no part (identical weights whatever they are)."""
    run_training(make_config(output=str(tmp_path / "default")))
    run_training(make_config(output=str(tmp_path / "other"), image_views=1, image_view_scale=[0.2, 0.3],
                             image_view_flip=False))
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "default" / "cache").glob("*.npy"))
    assert names == ["image-train", "image-val", "text-train", "text-val"]
    assert_same_state(model_state(tmp_path / "default"), model_state(tmp_path / "other"), exact=True)
    # A run folder from before image_views existed still resumes (the setting had its default then).
    saved = tmp_path / "default" / "train_config.json"
    old = {k: v for k, v in json.loads(saved.read_text()).items() if not k.startswith("image_view")}
    saved.write_text(json.dumps(old))
    Trainer(make_config(output=str(tmp_path / "default"), epochs=3), resume=True)


@pytest.mark.parametrize("overrides, where", [
    (dict(image=TowerTraining("full", lr=1e-3)), "here image.mode = 'full'"),
    (dict(image=TowerTraining("lora")), "here image.mode = 'lora'"),
    (dict(cache_frozen=False), "here cache_frozen = false"),
])
def test_views_without_a_frozen_cached_image_tower_are_refused(make_config, tmp_path, overrides, where):
    with pytest.raises(ConfigError) as caught:
        Trainer(make_config(image_views=4, **overrides))
    message = str(caught.value)
    assert message.startswith("image_views = 4 needs the image tower frozen and cached") and where in message
    assert not (tmp_path / "run").exists(), "refused before anything is written"


@pytest.mark.parametrize("views", [0, -2, 2.5, True])
def test_image_views_must_be_a_whole_number_of_at_least_one(make_config, views):
    with pytest.raises(ConfigError, match="image_views must be a whole number of at least 1"):
        Trainer(make_config(image_views=views))


@pytest.mark.slow
def test_train_command_takes_image_views_and_says_when_it_cannot(tmp_path, tiny_bert_dir, colour_data):
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_train_config(tiny_bert_dir, val_size=14, batch_size=7, warmup_steps=2,
                                                   workers=0, head_lr=0.01)))
    runner = CliRunner()
    base = ["train", "--config", str(config), "--data", str(colour_data), "--epochs", "1"]
    result = runner.invoke(cli, [*base, "-o", str(tmp_path / "run"), "--set", "image_views=2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["image_views"] == 2
    assert len(list((tmp_path / "run" / "cache").glob("image-train-views2-*.npy"))) == 1
    refused = runner.invoke(cli, [*base, "-o", str(tmp_path / "live"), "--set", "image_views=2",
                                  "--image-mode", "full"])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "image_views = 2 needs the image tower frozen and cached" in refused.output


@pytest.mark.slow
def test_views_train_with_the_label_bridge_in_place(tiny_bert_dir, tmp_path):
    """model.project gets the drawn view's features, and the bridge classifies that view."""
    from mmretrieve.bundle import load_bundle
    from mmretrieve.config import BridgeConfig
    from mmretrieve.data import load_captions, split_by_image
    from mmretrieve.evaluate import evaluate_model

    data = make_colour_dataset(tmp_path / "colours", per_colour=4)
    model = ModelConfig(
        text=TowerConfig("bert", {"model_name": str(tiny_bert_dir), "max_length": 16}),
        image=TowerConfig(f"timm:{TINY_TIMM}", {"pretrained": False, "image_size": 48}), embed_dim=16,
        bridge=BridgeConfig(enabled=True, classifier="test_bridge:random_classifier", top_t=5, weight=0.5))
    config = TrainConfig(data=str(data), model=model, val_size=7, batch_size=7, epochs=2, warmup_steps=1, workers=0,
                         head_lr=0.01, output=str(tmp_path / "run"), image_views=2)
    result = run_training(config)
    assert result.steps == 6 and result.best is not None
    loaded = load_bundle(result.best_bundle)
    _, val_items = split_by_image(load_captions(str(data)).items, 0.05, 0, 7)
    assert evaluate_model(loaded, val_items, progress=False) == result.best
    assert dataclasses.asdict(loaded.config.bridge)["enabled"]


@pytest.mark.slow
def test_torchrun_ranks_share_one_cache_of_views(tmp_path, tiny_bert_dir, colour_data):
    """Rank 0 computes the views, the other rank reads its file; both index them with the same plan."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_train_config(
        tiny_bert_dir, data=str(colour_data), val_size=14, batch_size=7, epochs=2, warmup_steps=2, workers=0,
        head_lr=0.01, output=str(tmp_path / "run"), image_views=3)))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmretrieve", "train",
                             "--config", str(config), "--json"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout[result.stdout.index("{"):])["steps"] == 4  # 28 images / (7 x 2 ranks) x 2
    assert len(list((tmp_path / "run" / "cache").glob("image-train-views3-*.npy"))) == 1


def test_one_view_beside_a_plain_cache_is_computed_as_that_cache(tmp_path, colour_data):
    # cached_view_features with views=1 is the plain preprocessing alone; a plain cache beside it
    # must not leave it no view to compute (it divided by zero).
    from mmretrieve.bundle import tower_fingerprint
    from mmretrieve.data import load_captions
    from mmretrieve.embedding import cached_tower_features, cached_view_features
    from mmretrieve.encoders.factory import create_encoder

    encoder = create_encoder(f"timm:{TINY_TIMM}", pretrained=False, image_size=48)
    paths = [item.image for item in load_captions(str(colour_data), progress=False).items[:4]]
    fingerprint = tower_fingerprint(encoder)
    plain = cached_tower_features(encoder, paths, tmp_path, 8, "cpu", "image-train", fingerprint)
    one = cached_view_features(encoder, paths, tmp_path, 8, "cpu", "image-train", fingerprint, 1, ViewAugmentation())
    assert one.shape == (4, 1, encoder.dim)
    np.testing.assert_allclose(one[:, 0].numpy(), plain.numpy(), rtol=1e-5, atol=1e-6)


def test_a_killed_runs_views_tmp_is_removed_and_a_live_writers_is_kept(tmp_path, colour_data):
    # A killed run leaves .NAME.PID.tmp, a full views array; the next caching call deletes it
    # unless its writer still runs. A failing call leaves no tmp of its own.
    import subprocess
    import sys

    from mmretrieve.bundle import tower_fingerprint
    from mmretrieve.data import load_captions
    from mmretrieve.embedding import cached_view_features
    from mmretrieve.encoders.factory import create_encoder
    from mmretrieve.errors import InputError

    encoder = create_encoder(f"timm:{TINY_TIMM}", pretrained=False, image_size=48)
    paths = [item.image for item in load_captions(str(colour_data), progress=False).items[:3]]
    fingerprint, settings = tower_fingerprint(encoder), ViewAugmentation()

    def views(inputs):
        return cached_view_features(encoder, inputs, tmp_path, 8, "cpu", "image-train", fingerprint, 2, settings)

    views(paths)
    [cache] = tmp_path.glob("image-train-views2-*.npy")
    cache.unlink()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead = tmp_path / f".{cache.name}.{int(finished.stdout)}.tmp"
    live = tmp_path / f".{cache.name}.{os.getppid()}.tmp"
    other = tmp_path / f".image-train-views2-0000000000000000.npy.{int(finished.stdout)}.tmp"
    for tmp in (dead, live, other):
        tmp.write_bytes(b"half written")
    views(paths)
    assert cache.is_file() and not dead.exists() and live.exists() and other.exists()

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError):
        views([*paths, str(broken)])
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted([live.name, other.name])
