import pytest

from mmretrieve.config import ModelConfig, apply_overrides, from_dict, load_config, read_config_file
from mmretrieve.errors import ConfigError


def test_config_files_in_each_format(tmp_path):
    (tmp_path / "m.toml").write_text('embed_dim = 128\n[text]\nencoder = "bert"\noptions = {pooling = "cls"}\n')
    (tmp_path / "m.yaml").write_text("embed_dim: 128\ntext:\n  encoder: bert\n  options: {pooling: cls}\n")
    (tmp_path / "m.json").write_text('{"embed_dim": 128, "text": {"encoder": "bert", "options": {"pooling": "cls"}}}')
    for name in ("m.toml", "m.yaml", "m.json"):
        config = load_config(ModelConfig, tmp_path / name)
        assert config.embed_dim == 128
        assert config.text.options == {"pooling": "cls"}
        assert config.image.encoder == "timm"  # untouched defaults survive


def test_set_overrides_win_over_the_file_and_parse_json(tmp_path):
    (tmp_path / "m.toml").write_text("embed_dim = 128\n")
    config = load_config(ModelConfig, tmp_path / "m.toml",
                         ("embed_dim=64", "text.options.max_length=32", "image.encoder=timm:resnet18"))
    assert config.embed_dim == 64
    assert config.text.options == {"max_length": 32}
    assert config.image.encoder == "timm:resnet18"


def test_unknown_setting_suggests_the_right_name():
    with pytest.raises(ConfigError, match=r"unknown setting 'text.encodr' \(did you mean 'encoder'\?\)"):
        from_dict(ModelConfig, {"text": {"encodr": "bert"}})


@pytest.mark.parametrize("override", ["novalue", "=3"])
def test_malformed_set_is_refused(override):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, [override])


def test_set_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"embed_dim": 3}, ["embed_dim.x=1"])


def test_broken_or_missing_files_give_one_sentence(tmp_path):
    (tmp_path / "bad.toml").write_text("embed_dim = = 3")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        read_config_file(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "x.ini").write_text("")
    with pytest.raises(ConfigError, match="must end in"):
        read_config_file(tmp_path / "x.ini")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        read_config_file(tmp_path / "list.yaml")
