"""Opening images: orientation, formats, and every way a file can be bad."""

import numpy as np
import pytest
from PIL import Image

from conftest import BAD_IMAGES, GOOD_IMAGES, random_image
from mmretrieve.errors import InputError
from mmretrieve.images import list_images, load_image


def test_list_images_recurses_skips_hidden_and_non_images(messy_image_folder):
    names = {p.name for p in list_images(messy_image_folder)}
    assert names == GOOD_IMAGES | BAD_IMAGES


def _mode_samples():
    """(name, image in a non-RGB mode, the RGB each of its four pixels must become)."""
    grey = Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8))  # L
    palette = Image.new("P", (2, 2))
    palette.putpalette([220, 20, 30, 30, 200, 40, 30, 40, 220, 250, 250, 0] + [0] * 756)
    palette.putdata([0, 1, 2, 3])
    bilevel = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    rgba = Image.fromarray(np.array([[(220, 20, 30, 255), (30, 200, 40, 0)],
                                     [(30, 40, 220, 255), (0, 0, 0, 0)]], dtype=np.uint8))
    cmyk = Image.frombytes("CMYK", (2, 2), bytes([35, 235, 225, 0, 225, 55, 215, 0,  # K=0: exactly 255 - C/M/Y
                                                  225, 215, 35, 0, 0, 0, 0, 255]))  # full K: black
    red, green, blue, white = (220, 20, 30), (30, 200, 40), (30, 40, 220), (255, 255, 255)
    return [pytest.param(*sample, id=sample[0]) for sample in [
        ("grey.png", grey, [(0, 0, 0), (77, 77, 77), (200, 200, 200), white]),
        ("palette.png", palette, [red, green, blue, (250, 250, 0)]),
        ("bilevel.bmp", bilevel, [(0, 0, 0), white, white, (0, 0, 0)]),
        ("rgba.png", rgba, [red, white, blue, white]),  # transparent pixels on white, not their hidden colour
        ("cmyk.tif", cmyk, [red, green, blue, (0, 0, 0)]),
    ]]


@pytest.mark.parametrize("name, image, expected", _mode_samples())
def test_every_colour_mode_loads_as_rgb_with_its_pixels(tmp_path, name, image, expected):
    image.save(tmp_path / name)
    with Image.open(tmp_path / name) as stored:
        assert stored.mode == image.mode != "RGB"  # the file really holds the non-RGB mode
    loaded = load_image(tmp_path / name)
    assert loaded.mode == "RGB" and loaded.size == (2, 2)
    assert np.asarray(loaded).reshape(4, 3).tolist() == [list(pixel) for pixel in expected]


def test_good_images_load_as_rgb(messy_image_folder):
    for path in list_images(messy_image_folder):
        if path.name in GOOD_IMAGES:
            assert load_image(path).mode == "RGB"


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_raise_input_error_naming_the_file(messy_image_folder, name):
    with pytest.raises(InputError, match=name):
        load_image(messy_image_folder / name)


def test_exif_orientation_is_applied(tmp_path):
    image = random_image(0, (60, 30))  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (30, 60)


def test_gif_uses_the_first_frame(tmp_path):
    red = Image.new("RGB", (20, 20), (255, 0, 0))
    blue = Image.new("RGB", (20, 20), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue])
    pixel = np.asarray(load_image(tmp_path / "anim.gif"))[5, 5]
    assert pixel[0] > 200 and pixel[2] < 50


def test_decompression_bomb_guard(tmp_path):
    random_image(0, (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="exceeds the 5000-pixel limit"):
        load_image(tmp_path / "big.png", max_pixels=5000)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="no such file or folder"):
        list_images(tmp_path / "nope")


# -- preprocessing: ordinary photos unchanged, the rest bounded by the output ------------------------

def _resize_then_crop(image, config):
    """The transform as it was before bounded preprocessing (torchvision's Resize + CenterCrop)."""
    import math

    from mmretrieve.preprocess import _PIL_INTERPOLATION

    size, scale = config.size, math.floor(config.size / config.crop_pct)
    width, height = image.size
    new_w, new_h = (scale, int(scale * height / width)) if width <= height else (int(scale * width / height), scale)
    image = image.resize((new_w, new_h), _PIL_INTERPOLATION[config.interpolation])
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1, 1) for v in (config.mean, config.std))
    return (array - mean) / std


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos"])
def test_ordinary_photos_preprocess_bit_identical_to_resize_then_crop(interpolation):
    from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor

    # squares and near-squares resample only the crop on one axis or both; (256, 243) and (2000, 1200)
    # are where Pillow 13 orders its two passes differently for the crop than for the whole image
    shapes = [(640, 480), (480, 640), (500, 500), (1920, 1080), (97, 61), (30, 90), (1000, 334), (4032, 3024),
              (224, 224), (256, 243), (243, 256), (1200, 2000), (2000, 1200), (333, 333)]
    for size, crop_pct in ((224, 0.875), (64, 0.875), (224, 0.9), (224, 1.0)):
        config = ImagePreprocessConfig(size=size, crop_pct=crop_pct, interpolation=interpolation)
        preprocessor = ImagePreprocessor(config)
        for seed, shape in enumerate(shapes):
            image = random_image(seed, shape)
            assert np.array_equal(preprocessor.transform(image), _resize_then_crop(image, config)), (size, shape)


def test_a_square_photo_resamples_only_the_crop(monkeypatch):
    """At 224/0.875 a square's crop is exact in Pillow's float32 box: 224 x 224 pixels are made,
    not 256 x 256 (0.77x the resampling)."""
    from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor

    made = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *a, **k: made.append(size) or resize(self, size, *a, **k))
    preprocessor = ImagePreprocessor(ImagePreprocessConfig())
    for shape in ((224, 224), (500, 500), (640, 480)):
        preprocessor.resize_crop(random_image(0, shape))
    assert made == [(224, 224), (224, 224), (341, 224)]  # a landscape photo: only its height is cropped


@pytest.mark.parametrize("settings", [{}, {"interpolation": "bilinear", "size": 64},
                                      {"interpolation": "nearest", "crop_offset": "floor", "size": 33},
                                      {"interpolation": "lanczos", "crop_pct": 1.0, "mean": (0.5, 0.5, 0.5),
                                       "std": (0.5, 0.5, 0.5)},
                                      {"resize": "squash", "size": 48, "mean": (0.48145466, 0.4578275, 0.40821073),
                                       "std": (0.26862954, 0.26130258, 0.27577711)}])
def test_the_uint8_path_normalises_bit_identical_to_the_float_path(settings):
    """resize_crop's bytes (what the decode workers send) through normalize, one at a time or as a
    batch, are bit for bit the float32 conversion and normalisation of the same resized image."""
    from mmretrieve.preprocess import _PIL_INTERPOLATION, ImagePreprocessConfig, ImagePreprocessor

    config = ImagePreprocessConfig(**settings)
    preprocessor = ImagePreprocessor(config)
    images = [random_image(seed, shape) for seed, shape in enumerate([(640, 480), (97, 61), (30, 90), (1000, 334),
                                                                      (48, 48)])]
    batch = np.stack([preprocessor.resize_crop(image) for image in images])
    assert batch.dtype == np.uint8 and batch.shape == (len(images), config.size, config.size, 3)
    normalised = preprocessor.normalize(batch)
    assert normalised.dtype == np.float32 and normalised.shape == (len(images), 3, config.size, config.size)
    mean, std = (np.asarray(v, dtype=np.float32).reshape(3, 1, 1) for v in (config.mean, config.std))
    for image, pixels, row in zip(images, batch, normalised):
        if config.resize == "squash":
            resized = image.resize((config.size, config.size), _PIL_INTERPOLATION[config.interpolation])
            array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
            expected = (array - mean) / std
        else:
            expected = _resize_then_crop(image, config) if config.crop_offset == "round" else preprocessor.transform(image)
            # the float arithmetic on the very bytes resize_crop made
            assert np.array_equal(expected, (np.asarray(pixels, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std)
        assert expected.tobytes() == row.tobytes() == preprocessor.normalize(pixels).tobytes()
        assert np.array_equal(preprocessor.transform(image), expected)
    # normalised floats go back to exactly their bytes (for a graph that takes uint8), every byte value
    every_value = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None, None], (1, 256, 2, 3)).copy()
    assert np.array_equal(preprocessor.to_uint8(preprocessor.normalize(every_value)), every_value)
    assert np.array_equal(preprocessor.to_uint8(normalised), batch)
    with pytest.raises(ValueError, match="uint8"):
        preprocessor.normalize(normalised)


def test_a_thin_strip_is_resampled_without_a_large_intermediate(monkeypatch):
    from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor

    made = []
    resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        made.append(size[0] * size[1])
        assert size[0] * size[1] <= 4 * 224 * 224, f"a {size} intermediate for a 224 px output"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    strip = Image.new("RGB", (1, 16000), (200, 30, 40))  # 256 x 4,096,000 (3 GB) the old way
    out = ImagePreprocessor(ImagePreprocessConfig()).transform(strip)
    assert out.shape == (3, 224, 224) and made
    expected = (200 / 255 - 0.485) / 0.229
    assert abs(float(out[0].mean()) - expected) < 1e-3  # the colour survives


def test_a_panorama_takes_the_bounded_path_and_stays_close_to_the_full_resize():
    from mmretrieve.preprocess import ImagePreprocessConfig, ImagePreprocessor

    config = ImagePreprocessConfig()
    smooth = Image.fromarray(np.random.default_rng(3).integers(0, 256, (6, 40, 3), dtype=np.uint8))
    for shape in ((1200, 100), (100, 1500), (250, 1000)):
        image = smooth.resize(shape, Image.Resampling.BICUBIC)
        ours, full = ImagePreprocessor(config).transform(image), _resize_then_crop(image, config)
        assert np.abs(ours - full).max() < 0.05  # under 3 grey levels, in normalised units


def test_absurd_aspect_ratios_are_refused_from_the_header(tmp_path):
    Image.new("RGB", (1, 16000)).save(tmp_path / "strip.png")
    with pytest.raises(InputError, match=r"strip.png: 1x16000 has an aspect ratio of 16000:1, beyond the 20:1"):
        load_image(tmp_path / "strip.png")
    assert load_image(Image.new("RGB", (2000, 100))).size == (2000, 100)  # 20:1 passes
    with pytest.raises(InputError, match="aspect ratio of 21:1"):
        load_image(Image.new("RGB", (2100, 100)))


# -- colour modes ----------------------------------------------------------------------------------

def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    from bad_inputs import png16

    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")  # Pillow writes mode I;16 as a 16-bit PNG
    Image.fromarray((values >> 8).astype(np.uint8)).save(tmp_path / "grey8.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    sixteen = np.asarray(load_image(tmp_path / "grey16.png")).astype(int)
    eight = np.asarray(load_image(tmp_path / "grey8.png")).astype(int)
    assert np.abs(sixteen - eight).max() <= 1 and abs(sixteen.mean() - 127.5) < 1
    big_endian = load_image(png16(values))  # a hand-made PNG decodes the same
    assert np.array_equal(np.asarray(big_endian), sixteen)


def test_16_bit_rgb_png_equals_its_8_bit_version():
    from bad_inputs import png16

    values = (np.random.default_rng(0).random((20, 30, 3)) * 65535).astype(np.uint16)
    assert np.array_equal(np.asarray(load_image(png16(values))), values >> 8)


def test_float_and_32_bit_images_are_scaled_into_8_bits(tmp_path):
    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    got = np.asarray(load_image(tmp_path / "float.tif"))[..., 0]
    assert got.min() == 0 and got.max() == 255 and np.array_equal(got, np.rint(ramp * 255).astype(np.uint8))
    wide = Image.fromarray((np.arange(256, dtype=np.int32).reshape(16, 16) - 100) * 1000)  # -100000..155000
    stretched = np.asarray(load_image(wide))[..., 0]
    assert stretched.min() == 0 and stretched.max() == 255 and np.all(np.diff(stretched.ravel().astype(int)) >= 0)


def test_transparency_is_composited_on_white_and_opaque_alpha_changes_nothing():
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[:, 10:] = (200, 30, 40, 255)
    image = load_image(Image.fromarray(rgba))
    assert image.getpixel((2, 2)) == (255, 255, 255) and image.getpixel((15, 2)) == (200, 30, 40)
    opaque = random_image(1).convert("RGBA")
    assert np.array_equal(np.asarray(load_image(opaque)), np.asarray(random_image(1)))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.info["transparency"] = 0
    assert load_image(palette).getpixel((1, 1)) == (255, 255, 255)
    grey_alpha = Image.merge("LA", (Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)))
    assert load_image(grey_alpha).getpixel((1, 1)) == (255, 255, 255)


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    Image.new("RGB", (32, 32), (220, 20, 30)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    pixel = load_image(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert all(abs(a - b) <= 12 for a, b in zip(pixel, (220, 20, 30)))


def test_huge_jpegs_decode_at_a_reduced_scale_and_keep_their_size(tmp_path, monkeypatch):
    from mmretrieve import images

    monkeypatch.setattr(images, "DRAFT_PIXELS", 100_000)
    monkeypatch.setattr(images, "DRAFT_SIDE", 100)
    random_image(0, (800, 600)).save(tmp_path / "big.jpg")
    image = load_image(tmp_path / "big.jpg")
    assert image.size == (200, 150) and image.info["source_size"] == (800, 600)


def test_huge_images_of_other_formats_are_reduced_before_their_colour_conversion(tmp_path, monkeypatch):
    """A PNG cannot be decoded reduced: a transparent one (converted in three full-size copies)
    is reduced right after decoding; an RGB one needs no conversion and is left whole."""
    from mmretrieve import images

    monkeypatch.setattr(images, "DRAFT_SIDE", 100)
    converted = []
    to_rgb = images.to_rgb
    monkeypatch.setattr(images, "to_rgb", lambda image, label="": converted.append(image.size) or to_rgb(image, label))
    pixels = np.zeros((620, 410, 4), np.uint8)
    pixels[..., 0], pixels[..., 3] = 255, 128  # half-transparent red
    Image.fromarray(pixels, "RGBA").save(tmp_path / "big.png")
    image = load_image(tmp_path / "big.png")
    assert converted == [(103, 155)] and image.size == (103, 155) and image.info["source_size"] == (410, 620)
    assert image.getpixel((50, 50)) == load_image(Image.fromarray(pixels[:8, :8], "RGBA")).getpixel((4, 4))
    Image.fromarray(pixels[..., :3]).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png").size == (410, 620)
    random_image(0, (410, 620)).convert("P").save(tmp_path / "palette.png")  # indices cannot be averaged
    assert load_image(tmp_path / "palette.png").size == (410, 620)


# -- only regular files are read, and only so much of them -------------------------------------------

def _in_thread(function, *args):
    """Run ``function`` and return what it returned or raised, failing (not hanging) after 20 s."""
    import threading

    result = {}

    def run():
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    return thread, result


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    thread, result = _in_thread(load_image, fifo)
    if thread.is_alive():  # the old reader blocks in open(): release it before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(result.get("error"), InputError) and "is a FIFO (named pipe)" in str(result["error"])


def test_devices_folders_and_oversized_files_are_refused_before_reading(tmp_path):
    import os

    from mmretrieve.images import read_image_file

    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    with pytest.raises(InputError, match="zero.jpg: is a device, not an image file"):
        load_image(tmp_path / "zero.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(InputError, match="dir.jpg: is a folder"):
        load_image(tmp_path / "dir.jpg")
    (tmp_path / "big.jpg").write_bytes(b"x" * 2000)
    with pytest.raises(InputError, match=r"over the .* MB limit for an image file \(2000 bytes\)"):
        read_image_file(tmp_path / "big.jpg", limit=1000)
    with open(tmp_path / "huge.jpg", "wb") as handle:
        handle.truncate((256 << 20) + 1)  # sparse
    with pytest.raises(InputError, match="over the 256 MB limit"):
        load_image(tmp_path / "huge.jpg")


def test_decoding_dev_zero_stays_within_a_small_memory_limit(tmp_path):
    """The indexer's reader on a link to /dev/zero, in a process that may use 1 GB at most."""
    import os
    import subprocess
    import sys

    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from mmretrieve.decode import decode_one; print(decode_one(sys.argv[1], object()).error)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "zero.jpg")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "is a device, not an image file", done.stderr[-500:]


def test_decode_one_turns_every_failure_into_a_reason(tmp_path):
    from mmretrieve.decode import decode_one

    random_image(0).save(tmp_path / "ok.png")

    class Exhausted:
        def resize_crop(self, image):
            raise MemoryError

    class Broken:
        def resize_crop(self, image):
            raise RuntimeError("boom")

    out_of_memory = decode_one(str(tmp_path / "ok.png"), Exhausted())
    assert out_of_memory.error == "ran out of memory while decoding it" and len(out_of_memory.sha256) == 64
    assert decode_one(str(tmp_path / "ok.png"), Broken()).error == "could not be decoded (RuntimeError: boom)"
