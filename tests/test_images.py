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
