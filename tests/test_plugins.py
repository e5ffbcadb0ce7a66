"""The plugin host: built-ins, entry points, attribution, clashes, broken plugins, env switches."""

from __future__ import annotations

from importlib import metadata

import pytest

from conftest import random_image  # module level: a plugin's conftest.py may take the name later
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
    assert record.source == "builtin" and record.registered["encoder"] == ["bert", "timm", "hf-pair-text", "hf-pair-image"]
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

    assert list_encoders(modality="image") == ["hf-pair-image", "timm"]
    assert list_encoders("b*") == ["bert"]


# -- Every plugin kind open at every edge: a third party's backend, runtime and loss, used ------

@pytest.fixture
def third_party(monkeypatch):
    """plugin_fixtures.THIRD_PARTY installed next to whatever is: a real entry point, loaded by the host."""
    installed = metadata.entry_points
    ours = entry_point("third-party", "plugin_fixtures:THIRD_PARTY")

    def entry_points(**selection):  # other libraries (pydantic) read their own groups through it too
        found = installed(**selection)
        return [*found, ours] if selection.get("group") == plugins.ENTRY_POINT_GROUP else found

    monkeypatch.setattr(plugins.metadata, "entry_points", entry_points)
    plugins.reset_host()
    plugin_fixtures.CALLS.clear()
    return plugin_fixtures.CALLS


@pytest.fixture
def tiny_bundle(tiny_model, tmp_path):
    from mmretrieve.bundle import save_bundle

    return save_bundle(tiny_model, tmp_path / "bundle").path


@pytest.fixture
def photos(tmp_path):

    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(4):
        random_image(seed).save(folder / f"{seed}.png")
    return folder


def invoke(*args):
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_third_party_index_backend_is_chosen_from_the_cli_built_and_searched(third_party, tiny_bundle, photos,
                                                                            tmp_path):
    import json

    index_dir = tmp_path / "index"
    result = invoke("index", photos, "--model", tiny_bundle, "--index-dir", index_dir, "--workers", 0,
                    "--index-type", "numpy-brute")
    assert "4 items (numpy-brute," in result.stdout
    assert [json.loads(p.read_text())["kind"] for p in index_dir.rglob("index.json")] == ["numpy-brute"]
    hits = json.loads(invoke("search", "a red dog", "--index-dir", index_dir, "-k", 3, "--json").stdout)
    assert len(hits) == 3 and {h["path"].rpartition("/")[2] for h in hits} <= {f"{i}.png" for i in range(4)}
    assert third_party["index.load"] >= 1 and third_party["index.search"] >= 1


def test_third_party_runtime_is_chosen_with_runtime_for_index_search_and_serve(third_party, tiny_bundle, photos,
                                                                              tmp_path, monkeypatch):
    import json

    index_dir = tmp_path / "index"
    invoke("index", photos, "--model", tiny_bundle, "--index-dir", index_dir, "--workers", 0, "--runtime", "counting")
    assert third_party["runtime.embed_pixels"] >= 1
    hits = json.loads(invoke("search", "a red dog", "--index-dir", index_dir, "--runtime", "counting", "--json").stdout)
    assert len(hits) == 4 and third_party["runtime.embed_texts"] >= 1

    from fastapi.testclient import TestClient

    from mmretrieve.serve import create_app

    answers = []

    def serve_in_process(config, **options):  # instead of uvicorn: the same app, one request
        with TestClient(create_app(config)) as client:
            answers.append((config.runtime, client.get("/api/search", params={"q": "a dog"}).json()))

    monkeypatch.setattr("mmretrieve.serve.server.serve", serve_in_process)
    texts_before = third_party["runtime.embed_texts"]
    invoke("serve", "--index-dir", index_dir, "--runtime", "counting", "--thumb-cache", tmp_path / "thumbs")
    (runtime, answer), = answers
    assert runtime == "counting" and third_party["runtime.embed_texts"] > texts_before
    assert len(answer["results"]) == 4


def test_third_party_loss_is_chosen_in_the_train_config_and_trains(third_party, tiny_bert_dir, tmp_path):
    import json

    from tiny_models import make_colour_dataset, tiny_train_config

    data = make_colour_dataset(tmp_path / "colours", per_colour=2)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_train_config(tiny_bert_dir, embed_dim=8, image_size=32, val_size=4, batch_size=4,
                                                   warmup_steps=1, workers=0, max_steps=2)))
    result = invoke("train", "--config", config, "--data", data, "--epochs", 1, "-o", tmp_path / "run",
                    "--set", "loss=counting-loss", "--set", 'loss_options={"scale": 2.0}')
    assert "trained 2 steps" in result.stdout
    assert third_party["loss.forward"] == 2 and third_party["loss.scale"] == 2.0


@pytest.mark.parametrize("args, message", [
    (["index", "--texts", "{data}", "--index-type", "numpy-brut"],
     "unknown index backend 'numpy-brut'; did you mean 'numpy-brute'?"),
    (["search", "a dog", "--runtime", "countin"], "unknown runtime 'countin'; did you mean 'counting'"),
])
def test_unknown_plugin_kinds_are_one_sentence_with_close_matches(third_party, tmp_path, args, message):
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    data = tmp_path / "captions.jsonl"
    data.write_text("")
    result = CliRunner().invoke(cli, [a.format(data=data) for a in args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args", [["index", "--help"], ["serve", "--help"], ["search", "--help"], ["eval", "--help"]])
def test_help_of_commands_with_plugin_kinds_imports_nothing_heavy(args):
    import subprocess
    import sys

    code = ("import sys; from mmretrieve.cli import main; sys.argv = ['mmretrieve', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm', 'faiss', 'onnxruntime', 'ray') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr
    assert "a plugin's" in result.stdout  # the help says plugins' names are accepted


# -- Encoder contracts: prefixes, factory signatures, rebuilding from a bundle ---------------------

def test_a_prefix_registered_twice_is_refused_naming_both_plugins():
    host = loaded_host()
    host.register(plugin_fixtures.SecondTimm(), "second-timm")
    registry = host.registry("encoder")
    refused = host.records["second-timm"].refused
    assert len(refused) == 1
    assert "prefix 'timm:'" in refused[0] and "'second-timm'" in refused[0]
    assert "'mmretrieve.default_plugins.encoders'" in refused[0]
    assert "other-timm" not in registry and "prefix-survivor" in registry
    from mmretrieve.encoders.factory import resolve_encoder_name

    with host_as_global(host):
        assert resolve_encoder_name("timm:resnet18")[0].name == "timm"
        assert resolve_encoder_name("mine:x")[0].name == "prefix-survivor"


def test_a_callable_factory_that_cannot_take_its_defaults_is_refused_at_registration():
    host = loaded_host()
    host.register(plugin_fixtures.DefaultsTheFactoryRefuses(), "no-size-plugin")
    assert "no-size" not in host.registry("encoder")
    assert "its factory takes no argument 'size'" in host.records["no-size-plugin"].refused[0]


class host_as_global:
    """Make ``host`` the process-wide one for a block (what create_encoder and load_bundle read)."""

    def __init__(self, host):
        self.host = host

    def __enter__(self):
        plugins._HOST = self.host

    def __exit__(self, *exc):
        plugins.reset_host()


def _plugin_image_encoder(family="tiny-image", preprocessor=None, options=None):
    """A plugin's Encoder class: no `pretrained` argument, its own family name."""
    from pathlib import Path

    from mmretrieve.encoders.timm_image import TimmEncoder
    from tiny_models import TINY_TIMM

    class TinyImage(TimmEncoder):
        def __init__(self, image_size=32):
            super().__init__(TINY_TIMM, pretrained=False, image_size=image_size)
            if preprocessor is not None:
                self.preprocessor = preprocessor

        def save_architecture(self, folder):
            self.preprocessor.save(Path(folder)) if hasattr(self.preprocessor, "save") else None
            return options if options is not None else {"image_size": self.options["image_size"]}

    TinyImage.family = family
    return TinyImage


def _register_image_encoder(encoder_class, name="tiny-image", defaults=None):
    from mmretrieve import hookimpl
    from mmretrieve.specs import EncoderSpec

    class Plugin:
        @hookimpl
        def register_encoders(self, register):
            register(EncoderSpec(name=name, modality="image", factory=encoder_class, defaults=defaults or {}))

    plugins.get_host().register(Plugin(), f"{name}-plugin")


def _model_with(image_encoder_name, tiny_bert_dir):
    from mmretrieve.config import ModelConfig, TowerConfig
    from mmretrieve.model import build_model

    return build_model(ModelConfig(text=TowerConfig("bert", {"model_name": str(tiny_bert_dir), "max_length": 16}),
                                   image=TowerConfig(image_encoder_name, {}), embed_dim=8))


def test_a_plugin_encoder_without_pretrained_saves_and_loads_again(tiny_bert_dir, tmp_path):
    import torch

    from mmretrieve.bundle import load_bundle, save_bundle

    _register_image_encoder(_plugin_image_encoder())
    model = _model_with("tiny-image", tiny_bert_dir)
    save_bundle(model, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    assert type(loaded.image_encoder).__name__ == "TinyImage" and loaded.image_encoder.registered_name == "tiny-image"
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_a_plugin_encoders_registered_defaults_apply_when_its_bundle_loads(tiny_bert_dir, tmp_path):
    from mmretrieve.bundle import load_bundle, save_bundle

    # save_architecture records nothing, so only the registered default says the tower is 48 px.
    _register_image_encoder(_plugin_image_encoder(options={}), defaults={"image_size": 48})
    model = _model_with("tiny-image", tiny_bert_dir)
    assert model.image_encoder.options["image_size"] == 48
    save_bundle(model, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.image_encoder.options["image_size"] == 48
    assert loaded.image_encoder.preprocessor.config.size == model.image_encoder.preprocessor.config.size


@pytest.mark.parametrize("kind, message", [
    ("family", "its encoder family 'tiny-imgae' is not a registered encoder name"),
    ("options", "takes no argument 'colour', which its save_architecture returned"),
    ("preprocessor", "its preprocessor is a function, not the TextPreprocessor or ImagePreprocessor"),
])
def test_a_tower_load_could_not_rebuild_is_refused_at_save_in_one_sentence(tiny_bert_dir, tmp_path, kind, message):
    from mmretrieve.bundle import save_bundle
    from mmretrieve.errors import BundleError

    encoder = {"family": _plugin_image_encoder(family="tiny-imgae"),
               "options": _plugin_image_encoder(options={"colour": "red"}),
               "preprocessor": _plugin_image_encoder(preprocessor=lambda items: {})}[kind]
    _register_image_encoder(encoder)
    model = _model_with("tiny-image", tiny_bert_dir)
    with pytest.raises(BundleError, match="cannot save the image tower") as caught:
        save_bundle(model, tmp_path / "bundle")
    assert message in str(caught.value) and "docs/plugins.md" in str(caught.value)
    assert not (tmp_path / "bundle").exists()


def test_a_bundle_whose_tower_cannot_be_rebuilt_is_one_sentence_at_load(tiny_bert_dir, tmp_path):
    import json

    from mmretrieve.bundle import load_bundle, save_bundle
    from mmretrieve.errors import BundleError

    _register_image_encoder(_plugin_image_encoder())
    save_bundle(_model_with("tiny-image", tiny_bert_dir), tmp_path / "bundle")
    model_json = tmp_path / "bundle" / "model.json"  # as a bundle saved before the check could be
    described = json.loads(model_json.read_text())
    described["towers"]["image"]["options"]["colour"] = "red"
    model_json.write_text(json.dumps(described))
    with pytest.raises(BundleError, match=r"its image tower cannot be rebuilt: the factory of the 'tiny-image' "
                                          r"encoder \(plugin 'tiny-image-plugin'\) takes no argument 'colour'"):
        load_bundle(tmp_path / "bundle", verify=False)


def test_builtin_and_third_party_implementations_satisfy_the_hookspec_protocols(tmp_path):
    from mmretrieve import hookspecs
    from mmretrieve.fusion.strategies import LateFusion, MeanFusion
    from mmretrieve.index.backends import FlatIndex
    from mmretrieve.train.losses import InfoNCELoss, SigLIPLoss

    for index in (FlatIndex(4), plugin_fixtures.NumpyIndex(4)):
        assert isinstance(index, hookspecs.IndexBackendProtocol)
    for loss in (InfoNCELoss(), SigLIPLoss(), plugin_fixtures.counting_loss()):
        assert isinstance(loss, hookspecs.LossProtocol)
    for strategy in (LateFusion(), MeanFusion(), plugin_fixtures.LouderModality(), plugin_fixtures.BestOfBoth()):
        assert isinstance(strategy, hookspecs.LateFusionProtocol if strategy.late else hookspecs.FusionStrategyProtocol)
    assert not isinstance(object(), hookspecs.EmbedderProtocol)


def test_hookspecs_import_without_torch_and_name_only_modules_that_exist():
    import importlib
    import re
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, mmretrieve.hookspecs; print([m for m in ('torch', 'numpy') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    from mmretrieve import hookspecs

    named = set(re.findall(r"mmretrieve(?:\.\w+)+", Path(hookspecs.__file__).read_text()))
    assert "mmretrieve.encoders.base.Encoder" in named
    for dotted in named:  # a module, or an attribute of one (mmretrieve.index.base.VectorIndex)
        module, attributes = dotted, []
        while True:
            try:
                target = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, _, attribute = module.rpartition(".")
                attributes.insert(0, attribute)
        for attribute in attributes:
            target = getattr(target, attribute)


# -- docs/plugins.md: its example package, installed from the page, used ---------------------------

def test_the_example_package_in_docs_plugins_md_works(tmp_path, monkeypatch, tiny_bundle):
    import re
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from click.testing import CliRunner

    from mmretrieve import hookspecs
    from mmretrieve.cli import cli

    page = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    files = dict(re.findall(r'```\w+ title="([^"]+)"\n(.*?)```', page, flags=re.S))
    assert {"pyproject.toml", "mmretrieve_example/plugin.py", "mmretrieve_example/index.py"} <= set(files)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "mmretrieve_example" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    value = re.search(r'^example = "(.+)"$', files["pyproject.toml"], flags=re.M).group(1)
    fake_entry_points(monkeypatch, entry_point("example", value))
    monkeypatch.delitem(sys.modules, "mmretrieve_example", raising=False)
    plugins.reset_host()
    host = plugins.get_host()

    assert host.records["example"].error is None and not host.records["example"].refused
    index = host.registry("index_backend").get("numpy-exact").build(dim=4)
    index.add([3, 9], np.eye(4, dtype=np.float32)[:2])
    index.save(tmp_path / "saved")
    from mmretrieve.index.backends import load_index

    scores, ids = load_index(tmp_path / "saved").search(np.eye(4, dtype=np.float32)[1], 3)
    assert ids.tolist() == [[9, 3, -1]] and isinstance(index, hookspecs.IndexBackendProtocol)

    louder = host.registry("fusion").get("louder").build(dim=2, weights=None)
    fused = louder.fuse(np.array([[0.6, -0.8]], np.float32), np.array([[1.0, 0.0]], np.float32))
    np.testing.assert_allclose(fused, [[1.0 / np.hypot(1, 0.8), -0.8 / np.hypot(1, 0.8)]], rtol=1e-6)

    loss = host.registry("loss").get("dcl").build(dist_info=None)
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert isinstance(loss, hookspecs.LossProtocol) and torch.isfinite(loss(features, features, torch.tensor(10.0)))

    from mmretrieve.encoders import create_encoder
    from mmretrieve.encoders.factory import rebuild_problem

    encoder = create_encoder("mobilenet-small", pretrained=False, image_size=64)
    assert encoder.family == "mobilenet-small" and encoder.dim == 1024
    (tmp_path / "tower").mkdir()
    assert rebuild_problem(encoder.family, encoder.save_architecture(tmp_path / "tower")) is None

    embedder = host.registry("runtime").get("cached-torch").build(model_ref=str(tiny_bundle), device="cpu")
    first = embedder.embed_texts(["a red dog", "a cat"])
    assert np.array_equal(embedder.embed_texts(["a cat", "a red dog"]), first[::-1]) and len(embedder.cache) == 2

    from mmretrieve.cli import _add_plugin_commands

    _add_plugin_commands()  # what main() does before parsing
    try:
        result = CliRunner().invoke(cli, ["example-hello", "you"])
    finally:
        cli.commands.pop("example-hello", None)
    assert result.exit_code == 0 and result.output == "hello you\n"


def test_an_option_the_encoder_factory_does_not_take_is_one_sentence():
    from mmretrieve.encoders import create_encoder
    from mmretrieve.errors import ConfigError

    with pytest.raises(ConfigError, match=r"encoder 'timm' takes no option 'colour' \(its options: model_name, "
                                          r"pretrained, weights, model_kwargs, image_size\)"):
        create_encoder("timm:resnet18", colour="red")


def test_a_runtime_that_builds_no_embedder_is_one_sentence(tmp_path):
    from mmretrieve import hookimpl
    from mmretrieve.errors import InputError
    from mmretrieve.runtime import load_embedder
    from mmretrieve.specs import RuntimeSpec

    class Plugin:
        @hookimpl
        def register_runtimes(self, register):
            register(RuntimeSpec(name="hollow", factory=lambda model_ref, device=None: object()))

    plugins.get_host().register(Plugin(), "hollow-plugin")
    with pytest.raises(InputError, match="runtime 'hollow' .*built a object, which has no embed_texts or "
                                         "embed_pixels; a runtime must build an embedder"):
        load_embedder(str(tmp_path), runtime="hollow")
