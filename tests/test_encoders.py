"""The built-in encoders on tiny random-weight models: shapes, pooling, padding, preprocessing."""

import numpy as np
import pytest
import torch

from conftest import random_image
from mmretrieve.encoders import create_encoder
from mmretrieve.errors import InputError
from tiny_models import TINY_TIMM


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    return create_encoder("bert", model_name=str(tiny_bert_dir), max_length=16)


@pytest.fixture(scope="module")
def image_encoder():
    torch.manual_seed(0)
    return create_encoder(f"timm:{TINY_TIMM}", pretrained=False, image_size=64)


def test_bert_embeds_texts_to_normalised_float32(bert):
    out = bert.embed(["a black cat", "two dogs running on the beach"])
    assert out.shape == (2, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert bert.modality == "text" and bert.dim == 32


def test_bert_embedding_does_not_depend_on_batch_padding(bert):
    alone = bert.embed(["a cat"])
    padded = bert.embed(["a cat", "a man and a woman with a dog in the park near the water"])[:1]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_bert_pooling_choices_differ_and_bad_pooling_is_refused(tiny_bert_dir, bert):
    cls = create_encoder("bert", model_name=str(tiny_bert_dir), pooling="cls")
    assert not np.allclose(cls.embed(["a black cat"]), bert.embed(["a black cat"]))
    with pytest.raises(InputError, match="pooling must be one of"):
        create_encoder("bert", model_name=str(tiny_bert_dir), pooling="max")


def test_bert_truncates_at_max_length(bert):
    inputs = bert.preprocess(["dog " * 100])
    assert inputs["input_ids"].shape == (1, 16)


def test_bert_missing_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(InputError, match="cannot load BERT checkpoint"):
        create_encoder("bert", model_name=str(tmp_path / "nothing-here"))


def test_timm_embeds_paths_and_pil_images(image_encoder, tmp_path):
    random_image(1).save(tmp_path / "a.png")
    out = image_encoder.embed([tmp_path / "a.png", random_image(2, (30, 90))])
    assert out.shape == (2, image_encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_timm_unknown_architecture_is_one_sentence():
    with pytest.raises(InputError, match="cannot build timm model 'no_such_net'"):
        create_encoder("timm:no_such_net", pretrained=False)


def test_image_preprocessing_matches_timms_own_eval_transform(image_encoder):
    import timm.data

    config = timm.data.resolve_data_config({}, model=image_encoder.module.model)
    config["input_size"] = (3, 64, 64)
    reference = timm.data.create_transform(**config)
    for seed, size in ((0, (97, 61)), (1, (64, 64)), (2, (300, 120))):
        image = random_image(seed, size)
        ours = image_encoder.preprocess([image])["pixel_values"][0]
        np.testing.assert_allclose(ours, reference(image).numpy(), atol=1e-5)


def test_example_inputs_run_through_the_module(bert, image_encoder):
    for encoder in (bert, image_encoder):
        inputs = {k: torch.from_numpy(v) for k, v in encoder.example_inputs(3).items()}
        assert set(inputs) == set(encoder.input_names)
        with torch.no_grad():
            assert encoder.forward(inputs).shape == (3, encoder.dim)


@pytest.mark.parametrize("name", [TINY_TIMM, "mobilenetv3_small_050", "test_vit"])
def test_timm_dim_is_the_width_of_what_the_tower_returns(name):
    encoder = create_encoder(f"timm:{name}", pretrained=False)
    inputs = {k: torch.from_numpy(v) for k, v in encoder.example_inputs(1).items()}
    with torch.no_grad():
        assert encoder.forward(inputs).shape == (1, encoder.dim)


def test_bert_and_timm_local_paths_under_home_are_found(tiny_bert_dir, image_encoder, tmp_path, monkeypatch):
    """``~/models/bert`` and ``--weights ~/w.pth`` name files in the home folder, as a shell would."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_bert_dir, tmp_path / "models" / "bert")
    text = create_encoder("bert", model_name="~/models/bert", max_length=16)
    assert text.embed(["a black cat"]).shape == (1, 32)
    torch.save(image_encoder.module.model.state_dict(), tmp_path / "w.pth")
    image = create_encoder(f"timm:{TINY_TIMM}", pretrained=False, weights="~/w.pth", image_size=64)
    picture = [random_image(3)]
    np.testing.assert_allclose(image.embed(picture), image_encoder.embed(picture), atol=1e-5)


def test_timm_missing_weights_file_is_one_sentence(tmp_path):
    with pytest.raises(InputError, match="no weights file"):
        create_encoder(f"timm:{TINY_TIMM}", pretrained=False, weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bert_training_batches_run_by_length_with_the_same_vectors_and_gradients(tiny_bert_dir, pooling):
    # Training splits a padded batch into runs of similar length (TRAINING_RUN captions, each cut
    # to its longest): it must change the cost only, never what the tower computes or learns.
    import copy

    from mmretrieve.encoders import bert as bert_module

    encoder = create_encoder("bert", model_name=str(tiny_bert_dir), max_length=16, pooling=pooling)
    tower = copy.deepcopy(encoder.module).train()
    for module in tower.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    words = "a dog runs across the green grass while two children watch from the old wooden fence".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(words[: int(n)]) for n in rng.integers(1, len(words) + 1, size=3 * bert_module.TRAINING_RUN + 5)]
    inputs = {k: torch.from_numpy(v) for k, v in encoder.preprocess(texts).items()}
    assert inputs["attention_mask"].sum(1).min() < inputs["attention_mask"].shape[1]  # padding to cut

    def run(split: bool):
        tower.zero_grad()
        out = tower(**inputs) if split else tower._forward(**inputs)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        return out.detach(), [p.grad.clone() for p in tower.parameters() if p.grad is not None]

    split_out, split_grads = run(True)
    whole_out, whole_grads = run(False)
    torch.testing.assert_close(split_out, whole_out, atol=1e-5, rtol=1e-4)
    assert len(split_grads) == len(whole_grads) > 0
    for a, b in zip(split_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    tower.eval()  # inference and export keep one batch, one graph
    tower._forward_in_runs = lambda *args: pytest.fail("an eval-mode forward was split into runs")
    torch.testing.assert_close(tower(**inputs), whole_out, atol=1e-5, rtol=1e-4)
