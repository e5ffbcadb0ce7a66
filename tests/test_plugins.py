"""The plugin host: built-ins, entry points, attribution, clashes, broken plugins, env switches."""

from __future__ import annotations

from importlib import metadata

import pytest

import plugin_fixtures
from mmretrieve import plugins
from mmretrieve.errors import PluginLoadError, RegistrationError, UnknownNameError
from mmretrieve.plugins import PluginHost


def loaded_host(strict=False) -> PluginHost:
    host = PluginHost(strict=strict)
    host.load_builtins()
    return host


def fake_entry_points(monkeypatch, *eps):
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [e for e in eps if e.group == group])


def entry_point(name, value):
    return metadata.EntryPoint(name=name, value=value, group="mmretrieve")


def test_builtins_register_bert_and_timm_through_pluggy():
    host = loaded_host()
    registry = host.registry("encoder")
    assert {"bert", "timm"} <= set(registry.names())
    assert registry.get("bert").plugin == "mmretrieve.default_plugins.encoders"
    assert registry.get("bert").modality == "text" and registry.get("timm").modality == "image"
    record = host.records["mmretrieve.default_plugins.encoders"]
    assert record.source == "builtin" and record.registered["encoder"] == ["bert", "timm"]
    # Built-ins are ordinary pluggy plugins.
    assert host.pm.has_plugin("mmretrieve.default_plugins.encoders")


def test_every_hook_reaches_its_registry():
    host = loaded_host()
    host.register(plugin_fixtures.EveryHook(), "every-hook", version="1.2")
    expected = {"encoder": "fake-text", "fusion": "fake-fusion", "loss": "fake-loss",
                "index_backend": "fake-index", "runtime": "fake-runtime", "model": "fake-model"}
    for kind, name in expected.items():
        spec = host.registry(kind).get(name)
        assert spec.plugin == "every-hook"
    assert host.registry("encoder").get("fake").name == "fake-text"  # alias
    assert host.registry("encoder").get("fake-text").build(dim=3) == {"dim": 3}
    listed = host.records["every-hook"].as_dict()
    assert listed["fusion_strategies"] == ["fake-fusion"] and listed["losses"] == ["fake-loss"]
    assert listed["index_backends"] == ["fake-index"] and listed["models"] == ["fake-model"]


def test_name_clash_is_refused_and_the_first_owner_kept(caplog):
    host = loaded_host()
    host.register(plugin_fixtures.ClashesWithBert(), "clasher")
    registry = host.registry("encoder")
    assert registry.get("bert").plugin == "mmretrieve.default_plugins.encoders"
    assert "clash-survivor" in registry  # the plugin's other names still register
    refused = host.records["clasher"].refused
    assert len(refused) == 1 and "'bert'" in refused[0] and "clasher" in refused[0]
    assert "clashes" in caplog.text


def test_name_clash_raises_in_strict_mode():
    host = loaded_host(strict=True)
    host.register(plugin_fixtures.ClashesWithBert(), "clasher")
    with pytest.raises(RegistrationError, match="clashes with the one registered by plugin"):
        host.registry("encoder")


def test_plugin_that_fails_to_import_is_reported_and_skipped(monkeypatch):
    fake_entry_points(monkeypatch, entry_point("broken", "no_such_module_anywhere"),
                      entry_point("good", "plugin_fixtures"))
    host = loaded_host()
    host.load_entry_points()
    assert "ModuleNotFoundError" in host.records["broken"].error
    assert "entry-point-encoder" in host.registry("encoder")
    assert "bert" in host.registry("encoder")


def test_plugin_that_fails_to_import_raises_in_strict_mode(monkeypatch):
    fake_entry_points(monkeypatch, entry_point("broken", "no_such_module_anywhere"))
    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    host = PluginHost()
    with pytest.raises(PluginLoadError, match="'broken' failed to load"):
        host.load_entry_points()


def test_plugin_raising_in_a_hook_is_skipped_as_a_whole():
    host = loaded_host()
    host.register(plugin_fixtures.RaisesInHook(), "raiser")
    assert "never-seen" not in host.registry("loss")
    assert "boom" in host.records["raiser"].error
    assert "bert" in host.registry("encoder")


def test_misspelled_hook_name_is_caught():
    host = loaded_host()
    host.register(plugin_fixtures.MisspelledHook(), "typo")
    assert "register_encoder" in host.records["typo"].error
    assert not host.pm.has_plugin("typo")


def test_invalid_spec_is_refused_with_the_reason():
    host = loaded_host()
    host.register(plugin_fixtures.BadModality(), "bad-modality")
    assert "audio-thing" not in host.registry("encoder")
    assert "modality must be one of" in host.records["bad-modality"].refused[0]


def test_load_plugins_env_selects_entry_points(monkeypatch):
    fake_entry_points(monkeypatch, entry_point("good", "plugin_fixtures"), entry_point("broken", "no_such_module"))
    monkeypatch.setenv(plugins.ENV_LOAD, "good")
    host = loaded_host()
    host.load_entry_points()
    assert "broken" not in host.records and "entry-point-encoder" in host.registry("encoder")

    monkeypatch.setenv(plugins.ENV_LOAD, "")
    host = loaded_host()
    host.load_entry_points()
    assert {r.source for r in host.records.values()} == {"builtin"}


def test_block_plugins_env_blocks_builtins_too(monkeypatch):
    monkeypatch.setenv(plugins.ENV_BLOCK, "mmretrieve.default_plugins.encoders")
    host = loaded_host()
    assert "bert" not in host.registry("encoder")
    assert "blocked" in host.records["mmretrieve.default_plugins.encoders"].error


def test_unknown_name_suggests_close_matches():
    registry = loaded_host().registry("encoder")
    with pytest.raises(UnknownNameError, match=r"unknown encoder 'bret'; did you mean 'bert'\?"):
        registry.get("bret")


def test_create_encoder_resolves_source_prefixes():
    from mmretrieve.encoders.factory import resolve_encoder_name

    spec, implied = resolve_encoder_name("timm:resnet18")
    assert spec.name == "timm" and implied == {"model_name": "resnet18"}
    spec, implied = resolve_encoder_name("hf-hub:bert-base-uncased")
    assert spec.name == "bert" and implied == {"model_name": "bert-base-uncased"}
    with pytest.raises(UnknownNameError):
        resolve_encoder_name("nope:thing")


def test_list_encoders_filters_by_pattern_and_modality(monkeypatch):
    from mmretrieve.encoders import list_encoders

    monkeypatch.setenv(plugins.ENV_LOAD, "")  # built-ins only, whatever is installed

    assert list_encoders(modality="image") == ["timm"]
    assert list_encoders("b*") == ["bert"]
