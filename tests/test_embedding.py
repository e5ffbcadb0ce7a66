"""The one embedding loop (mmretrieve.embedding) and the one decoding pool (mmretrieve.decode)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image

from mmretrieve.errors import InputError

ROOT = Path(__file__).resolve().parents[1] / "mmretrieve"


class SizePreprocessor:
    """A torch-free stand-in: an image becomes [width, height]."""

    def resize_crop(self, image):
        return np.array(image.size, dtype=np.float32)


@pytest.fixture
def mixed_paths(tmp_path):
    random_image(1, (10, 20)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    random_image(2, (30, 40)).save(tmp_path / "c.png")
    random_image(3, (50, 60)).save(tmp_path / "e.png")
    random_image(4, (70, 80)).save(tmp_path / "f.png")
    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]  # d.png does not exist
    return [str(tmp_path / name) for name in names]


class Counter:
    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n


@pytest.mark.parametrize("workers", [0, 2])
def test_image_batches_hold_every_image_once_with_failures_and_their_reasons(mixed_paths, workers):
    from mmretrieve.embedding import embed_image_batches

    bar = Counter()
    batches = list(embed_image_batches(mixed_paths, SizePreprocessor(), lambda pixels: pixels * 10, batch_size=2,
                                       workers=workers, bar=bar))
    name = lambda d: Path(d.path).name  # noqa: E731
    assert [[name(d) for d in b.decoded] for b in batches] == [["a.png", "c.png"], ["e.png", "f.png"], []]
    assert [[(name(d), d.error) for d in b.failed] for b in batches] == [
        [("b.png", "unreadable image (Truncated File Read)")], [("d.png", "no such file")], []]
    assert [b.final for b in batches] == [False, False, True]
    assert batches[0].vectors.tolist() == [[100, 200], [300, 400]] and batches[-1].vectors is None
    assert bar.n == len(mixed_paths)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_decode_pool_sends_uint8_pixels_that_normalise_to_the_float_transform(mixed_paths, workers):
    from mmretrieve.decode import decode_images
    from mmretrieve.images import load_image
    from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor

    preprocessor = ImagePreprocessor(ImagePreprocessConfig(size=24, interpolation="bilinear"))
    decoded = [d for d in decode_images(mixed_paths, preprocessor, workers) if d.error is None]
    assert len(decoded) == 4
    for d in decoded:
        assert d.pixels.dtype == np.uint8 and d.pixels.shape == (24, 24, 3)  # a quarter of float32's bytes
        assert np.array_equal(preprocessor.normalize(d.pixels), preprocessor.transform(load_image(d.path)))


def test_without_workers_the_callers_thread_decodes_each_image_as_it_is_taken(mixed_paths, monkeypatch):
    """0 workers: no pool and no read-ahead; embed_image_batches' own embedding thread is what
    overlaps the decoding with the engine."""
    import mmretrieve.decode
    from mmretrieve.decode import decode_images

    decoded_on = []
    decode_one = mmretrieve.decode.decode_one
    monkeypatch.setattr(mmretrieve.decode, "decode_one",
                        lambda path, preprocessor=None: decoded_on.append(threading.get_ident()) or
                        decode_one(path, preprocessor))
    before = threading.active_count()
    stream = decode_images(mixed_paths * 4, SizePreprocessor(), workers=0)
    first = next(stream)
    assert Path(first.path).name == "a.png" and len(decoded_on) == 1 and threading.active_count() == before
    rest = [next(stream) for _ in range(7)]
    assert [Path(d.path).name for d in [first] + rest] == [Path(p).name for p in mixed_paths + mixed_paths[:2]]
    assert decoded_on == [threading.get_ident()] * 8  # one image decoded per image taken, here
    stream.close()


def test_strict_image_embedding_names_the_first_image_that_fails(mixed_paths):
    from mmretrieve.embedding import embed_image_paths

    with pytest.raises(InputError, match=r"b\.png: unreadable image"):
        embed_image_paths(mixed_paths, SizePreprocessor(), lambda pixels: pixels, 4, 2, strict=True)
    rows, embedded, failed = embed_image_paths(mixed_paths, SizePreprocessor(), lambda pixels: pixels, 4, 2)
    assert rows.dtype == np.float32 and rows.tolist() == [[10, 20], [30, 40], [50, 60], [70, 80]]
    assert [Path(d.path).name for d in embedded] == ["a.png", "c.png", "e.png", "f.png"]
    assert all(d.pixels is None for d in embedded)  # the collected rows do not keep the pixels alive
    assert [Path(d.path).name for d in failed] == ["b.png", "d.png"]


def test_text_batches_count_on_the_bar_and_an_empty_collection_has_the_width():
    from mmretrieve.embedding import embed_in_batches

    bar, sizes = Counter(), []
    rows = embed_in_batches([f"t{i}" for i in range(5)], lambda chunk: sizes.append(len(chunk)) or np.ones((len(chunk), 3)),
                            batch_size=2, dim=3, bar=bar)
    assert sizes == [2, 2, 1] and rows.shape == (5, 3) and rows.dtype == np.float32 and bar.n == 5
    assert embed_in_batches([], None, 2, 3).shape == (0, 3)


def test_the_bar_counts_a_text_batch_once_the_caller_has_handled_it():
    from mmretrieve.embedding import embed_batches

    bar, seen = Counter(), []
    for chunk, rows in embed_batches(list("abcde"), lambda chunk: np.zeros((len(chunk), 2)), 3, bar):
        seen.append((list(chunk), rows.shape, bar.n))
    assert seen == [(["a", "b", "c"], (3, 2), 0), (["d", "e"], (2, 2), 3)] and bar.n == 5


@pytest.mark.parametrize("threads", [True, False])
def test_the_pool_keeps_input_order(threads):
    from mmretrieve.decode import ordered_map

    assert list(ordered_map(_square, range(20), 3, read_ahead=4, threads=threads)) == [i * i for i in range(20)]


def _square(x):
    return x * x


def test_the_pool_reads_ahead_a_bounded_amount_and_stops_when_closed():
    from mmretrieve.decode import ordered_map

    started, lock = [], threading.Lock()

    def work(x):
        with lock:
            started.append(x)
        return x

    results = ordered_map(work, range(1000), 2, read_ahead=4, threads=True)
    assert next(results) == 0
    assert len(started) <= 5
    results.close()
    settled = len(started)
    assert settled <= 6 and len(started) == settled


def test_the_tower_loop_gives_the_vectors_of_a_direct_forward(tiny_model, tmp_path):
    """Decoding in the pool (any workers) then embedding equals the tower's own preprocess + forward."""
    import torch

    from mmretrieve.embed import collect_inputs, run_embed
    from mmretrieve.embedding import tower_features
    from mmretrieve.images import load_image

    paths = []
    for seed in range(7):
        random_image(seed, (40 + seed, 50)).save(tmp_path / f"{seed}.png")
        paths.append(tmp_path / f"{seed}.png")
    encoder = tiny_model.image_encoder
    encoder.module.eval()
    with torch.inference_mode():
        direct = [encoder.forward({"pixel_values": torch.from_numpy(np.stack(
            [encoder.preprocessor.transform(load_image(p)) for p in paths[i:i + 3]]))}).float().numpy()
            for i in range(0, len(paths), 3)]
    for workers in (0, 2):
        features = tower_features(encoder, paths, 3, torch.device("cpu"), workers, progress=False)
        np.testing.assert_array_equal(features, np.concatenate(direct))

    bundle_dir = tmp_path / "bundle"
    from mmretrieve.bundle import save_bundle

    save_bundle(tiny_model, bundle_dir)
    (tmp_path / "notes.txt").write_text("not an image")
    inputs = collect_inputs([], None, [*map(str, paths), str(tmp_path / "notes.txt")])
    result = run_embed(inputs, tmp_path / "out.npy", "json", None, str(bundle_dir), 3, True, "cpu", None, ())
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), tiny_model.embed("image", paths, batch_size=3,
                                                                                 device="cpu"))
    assert result["skipped"] == [{"path": str(tmp_path / "notes.txt"), "reason": "not an image file type"}]


def test_callers_keep_no_loop_or_pool_of_their_own():
    """evaluate, embed, the indexer, training and data go through mmretrieve.embedding / mmretrieve.decode."""
    sources = {name: (ROOT / name).read_text() for name in
               ("evaluate.py", "embed.py", "data.py", "index/builder.py", "train/pipeline.py", "encoders/base.py")}
    for name, text in sources.items():
        for banned in ("DataLoader(", "ThreadPoolExecutor", "multiprocessing", "index.decode", "train.pipeline"):
            assert banned not in text, f"{name} has {banned!r}"
    for name in ("evaluate.py", "embed.py", "index/builder.py"):  # batches are stacked in the one loop
        assert "np.stack(" not in sources[name], name
    for name in ("embed.py", "index/builder.py"):
        assert "range(0, len(" not in sources[name], name
    assert not (ROOT / "index" / "decode.py").exists()


def test_the_next_image_batch_is_embedded_on_its_own_thread_while_the_caller_handles_one(mixed_paths):
    """The indexer records a batch in SQLite while the engine already embeds the next: the second
    embed_pixels call starts before the caller is done with the first batch."""
    from mmretrieve.embedding import embed_image_batches

    calls, second_started = [], threading.Event()

    def embed(pixels):
        calls.append(threading.get_ident())
        if len(calls) == 2:
            second_started.set()
        return pixels * 10

    bar, seen = Counter(), []
    for batch in embed_image_batches(mixed_paths, SizePreprocessor(), embed, batch_size=1, bar=bar):
        if not seen:
            assert second_started.wait(10), "the next batch waited for the caller"
        seen.append(([Path(d.path).name for d in batch.decoded], bar.n))
    # each failure is counted with the batch it comes with
    assert seen == [(["a.png"], 0), (["c.png"], 1), (["e.png"], 3), (["f.png"], 5), ([], 6)]
    # the first batch here (what an embedder sets up on first use is set up in the caller's thread),
    # the rest on one thread of its own, in order
    assert calls[0] == threading.get_ident() and threading.get_ident() not in calls[1:] and len(set(calls[1:])) == 1


def test_an_embedding_error_reaches_the_caller_and_no_thread_outlives_the_batches(mixed_paths):
    import time

    from mmretrieve.embedding import embed_image_batches

    before = threading.active_count()

    def fails_on_second(pixels, calls=[]):  # noqa: B006 - counts across calls
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the engine broke")
        return pixels

    handled = []
    with pytest.raises(RuntimeError, match="the engine broke"):
        for batch in embed_image_batches(mixed_paths, SizePreprocessor(), fails_on_second, batch_size=1):
            handled.append(Path(batch.decoded[0].path).name)
    assert handled == ["a.png"]  # the batch before the failure was handed over whole, none after
    stream = embed_image_batches(mixed_paths * 3, SizePreprocessor(), lambda p: p, batch_size=1)
    next(stream)
    stream.close()  # an abandoned run (Ctrl-C, an error in the caller)
    for _ in range(100):
        if threading.active_count() == before:
            break
        time.sleep(0.05)
    assert threading.active_count() == before


def test_strict_raises_the_engine_error_of_a_batch_before_an_image_that_fails_to_decode(mixed_paths):
    import time

    from mmretrieve.embedding import embed_image_batches

    def fails_on_second(pixels, calls=[]):  # noqa: B006 - counts across calls
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.3)  # the caller meanwhile reaches b.png (the error must be waited for)
            raise RuntimeError("the engine broke")
        return pixels

    a, b, c = mixed_paths[:3]
    with pytest.raises(RuntimeError, match="the engine broke"):  # c.png's batch comes before b.png
        list(embed_image_batches([a, c, b], SizePreprocessor(), fails_on_second, batch_size=1, strict=True))
    with pytest.raises(InputError, match=r"b\.png"):  # the same run with an engine that works
        list(embed_image_batches([a, c, b], SizePreprocessor(), lambda p: p, batch_size=1, strict=True))


def test_an_engine_error_handed_over_is_raised_as_it_is_not_the_next_batchs(mixed_paths):
    import time

    from mmretrieve.embedding import embed_image_batches

    def refuses_second_fails_third(pixels, calls=[]):  # noqa: B006 - counts across calls
        calls.append(1)
        if len(calls) == 2:
            time.sleep(0.3)  # still running when the third batch is queued behind it
            raise InputError("the engine refused the second batch")
        if len(calls) == 3:
            raise RuntimeError("the third batch broke")
        return pixels

    good = [mixed_paths[i] for i in (0, 2, 4, 5)]
    with pytest.raises(InputError, match="refused the second batch"):
        list(embed_image_batches(good, SizePreprocessor(), refuses_second_fails_third, batch_size=1, strict=True))


def test_the_first_image_groups_ramp_up_so_the_engine_starts_after_four_decodes(tmp_path):
    from mmretrieve.embedding import embed_image_batches

    for i in range(40):
        random_image(i, (8, 8)).save(tmp_path / f"{i:02d}.png")
    paths = sorted(str(p) for p in tmp_path.iterdir())
    sizes, rows = [], []
    for batch in embed_image_batches(paths, SizePreprocessor(), lambda pixels: pixels, batch_size=32):
        sizes.append(len(batch.decoded))
        rows += [Path(d.path).name for d in batch.decoded]
    assert sizes == [4, 8, 16, 12] and rows == [Path(p).name for p in paths]  # whole runs of 4, in order
    assert [len(b.decoded) for b in embed_image_batches(paths[:6], SizePreprocessor(), lambda p: p, 2)] == [2, 2, 2, 0]
