"""Contrastive training on tiny random-initialised towers and a generated colour data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmretrieve.bundle import load_bundle
from mmretrieve.config import TowerConfig, TowerTraining
from mmretrieve.errors import BundleError, ConfigError, InputError
from mmretrieve.train import checkpoint as ckpt
from mmretrieve.train.loop import Trainer, run_training
from tiny_models import TINY_TIMM, model_state, tiny_train_config

pytestmark = pytest.mark.slow


def test_training_improves_retrieval_and_writes_the_run_folder(make_config, tmp_path):
    result = run_training(make_config(epochs=30))
    assert result.steps == 30 * 4  # 28 training images // 7 per batch
    base, best = result.baseline, result.best
    assert best["t2i"]["R@5"] >= base["t2i"]["R@5"] + 40
    assert best["i2t"]["R@5"] >= base["i2t"]["R@5"] + 40
    run = tmp_path / "run"
    for name in ("best/manifest.json", "metrics.jsonl", "curves.png", "summary.json", "train_config.json",
                 "checkpoint/state.pt"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["baseline"] and {"loss", "lr", "pairs_per_s", "data_wait", "temperature"} <= set(records[1])
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # The best bundle reproduces the validation numbers it was saved with.
    from mmretrieve.data import load_captions
    from mmretrieve.evaluate import evaluate_model

    bundle = load_bundle(run / "best")
    assert bundle.bundle.manifest["metadata"]["val"] == best
    # The split is seeded, so it can be recomputed the same way.
    from mmretrieve.data import split_by_image

    _, val_items = split_by_image(load_captions(make_config().data).items, 0.05, 0, 14)
    assert evaluate_model(bundle, val_items) == best


def test_full_fine_tuning_improves_retrieval(make_config):
    from mmretrieve.metrics import mean_recall

    result = run_training(make_config(text=TowerTraining("full", lr=1e-3), image=TowerTraining("full", lr=1e-3),
                                      epochs=20))
    assert mean_recall(result.best) >= mean_recall(result.baseline) + 25


def test_frozen_towers_train_heads_on_cached_features(make_config, tmp_path):
    result = run_training(make_config(epochs=3))
    assert len(list((tmp_path / "run" / "cache").glob("*.npy"))) == 4  # image/text x train/val
    state = model_state(tmp_path / "run")
    tower_parameters = {n for n, _ in Trainer(make_config(output=str(tmp_path / "other"))).model.named_parameters()
                        if n.startswith(("text_tower.", "image_tower."))}
    assert not tower_parameters & set(state), "frozen tower weights are rebuilt, not checkpointed"
    assert {"text_head.weight", "image_head.weight", "logit_scale"} <= set(state)
    assert result.best is not None


def test_reference_bundle_holds_only_the_trained_parameters(make_config, tmp_path):
    import timm
    from safetensors import safe_open

    weights = tmp_path / "tiny-timm.pth"  # fixed image-tower weights, as a wheel would ship them
    torch.save(timm.create_model(TINY_TIMM, num_classes=0).state_dict(), weights)
    config = make_config(epochs=2, bundle_towers="reference")
    config.model.image = TowerConfig(f"timm:{TINY_TIMM}", {"weights": str(weights), "image_size": 48})
    result = run_training(config)

    with safe_open(str(Path(result.best_bundle) / "weights.safetensors"), "pt") as stored:
        assert set(stored.keys()) == {"text_head.weight", "image_head.weight", "logit_scale"}
    loaded = load_bundle(result.best_bundle)
    trained = model_state(tmp_path / "run")
    assert torch.equal(loaded.image_head.weight, trained["image_head.weight"])
    assert loaded.bundle.model["towers"]["image"]["reference"]["changed_tensors"] == 0


def test_reference_bundle_refuses_randomly_initialised_towers(make_config):
    with pytest.raises(BundleError, match="new random weights each time"):
        Trainer(make_config(bundle_towers="reference"))


def test_resume_continues_exactly_as_an_uninterrupted_run(make_config, tmp_path, monkeypatch):
    settings = dict(text=TowerTraining("full", lr=1e-3), image=TowerTraining("top:1", lr=1e-3), epochs=2,
                    eval_every=100)
    run_training(make_config(output=str(tmp_path / "straight"), **settings))

    original_report = Trainer._report

    def interrupt_after_step_3(self, bar, window):
        original_report(self, bar, window)
        if self.state["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_report", interrupt_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_training(make_config(output=str(tmp_path / "killed"), **settings))
    assert json.loads(ckpt.load_checkpoint(tmp_path / "killed" / "checkpoint")["trainer"])["step"] == 3
    monkeypatch.setattr(Trainer, "_report", original_report)
    resumed = Trainer(make_config(output=str(tmp_path / "killed"), **settings), resume=True).train()
    assert resumed.steps == 8
    straight, killed = model_state(tmp_path / "straight"), model_state(tmp_path / "killed")
    assert straight.keys() == killed.keys()
    for name in straight:
        torch.testing.assert_close(killed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)


def test_existing_run_needs_resume_and_resume_needs_the_same_settings(make_config):
    run_training(make_config(epochs=1))
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(make_config(epochs=1))
    with pytest.raises(ConfigError, match="cannot resume .*: batch_size differs"):
        Trainer(make_config(epochs=2, batch_size=4), resume=True)


def test_resume_fills_nested_settings_added_since_the_run_with_their_defaults(make_config):
    # A run written before a nested setting existed (here text.grad_checkpointing and
    # model.bridge.top_t) resumes when the setting now has its default, and not when it differs.
    config = make_config(epochs=1)
    run_training(config)
    path = Path(config.output) / "train_config.json"
    saved = json.loads(path.read_text())
    del saved["text"]["grad_checkpointing"], saved["model"]["bridge"]["top_t"]
    path.write_text(json.dumps(saved))
    Trainer(make_config(epochs=2), resume=True)
    with pytest.raises(ConfigError, match="cannot resume .*: text differs"):
        Trainer(make_config(epochs=2, text=TowerTraining("frozen", grad_checkpointing=True)), resume=True)


def test_resume_without_a_checkpoint_is_refused(make_config):
    with pytest.raises(ConfigError, match="nothing to resume"):
        Trainer(make_config(), resume=True)


@pytest.mark.parametrize("mode, trains", [
    ("frozen", lambda name: False),
    ("full", lambda name: True),
    ("bitfit", lambda name: name.endswith("bias")),
    ("top:1", lambda name: name.startswith("model.encoder.layer.1.")),
])
def test_text_tower_training_modes(make_config, mode, trains):
    trainer = Trainer(make_config(text=TowerTraining(mode)))
    params = dict(trainer.model.text_tower.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if trains(n)}


def test_lora_trains_adapters_and_bundles_them_merged(make_config, tmp_path):
    # Validate only at the end, so the best bundle is the final model compared below.
    config = make_config(text=TowerTraining("lora", lr=1e-2, lora_rank=4), epochs=2, eval_every=10_000)
    trainer = Trainer(config)
    trainable = [n for n, p in trainer.model.text_tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    result = trainer.train()
    bundle = load_bundle(tmp_path / "run" / "best")
    assert not any("lora" in k for k in bundle.state_dict())
    texts = ["a red dog", "a blue car"]
    assert np.allclose(bundle.embed("text", texts), trainer.model.embed("text", texts), atol=1e-5)
    assert result.best is not None


def test_lora_without_matching_layers_is_one_sentence(make_config):
    with pytest.raises(ConfigError, match="LoRA found no layers named .* in the image tower"):
        Trainer(make_config(image=TowerTraining("lora")))


def test_bad_mode_is_refused(make_config):
    with pytest.raises(ConfigError, match="tower training mode must be one of"):
        Trainer(make_config(text=TowerTraining("top:x")))


def test_siglip_loss_trains_its_bias(make_config, tmp_path):
    trainer = Trainer(make_config(loss="siglip", epochs=30))
    bias_before = trainer.loss.logit_bias.item()
    result = trainer.train()
    assert trainer.loss.logit_bias.item() != bias_before
    assert result.best["t2i"]["R@5"] >= result.baseline["t2i"]["R@5"] + 40
    assert result.best["i2t"]["R@5"] >= result.baseline["i2t"]["R@5"] + 40


def test_early_stopping_with_patience(make_config):
    # Nothing can improve with every learning rate at zero, so patience runs out.
    result = run_training(make_config(head_lr=0.0, epochs=10, eval_every=2, patience=2))
    assert result.stopped_early and result.steps == 6  # best at step 2, two evaluations without gain


def test_gradient_accumulation_and_bf16_autocast(make_config):
    result = run_training(make_config(grad_accum=2, precision="bf16", text=TowerTraining("full"), epochs=2))
    assert result.steps == 4  # 8 micro-batches / 2


def test_fp16_on_cpu_is_refused(make_config):
    with pytest.raises(ConfigError, match="fp16 autocast needs a CUDA device"):
        Trainer(make_config(precision="fp16"))


def test_too_few_images_for_a_batch(make_config):
    with pytest.raises(InputError, match="cannot fill one batch of 64"):
        Trainer(make_config(batch_size=64))


def test_bad_training_images_are_skipped_or_stop_under_strict(make_config, colour_data, tmp_path):
    lines = colour_data.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    extra = json.dumps({"image": "images/bad.png", "captions": ["a red hat"]})
    absolute = [json.dumps({**json.loads(line), "image": str(colour_data.parent / json.loads(line)["image"])})
                for line in lines]
    broken.write_text("\n".join([*absolute, extra, "{not json"]) + "\n")
    trainer = Trainer(make_config(data=str(broken)))
    assert len(trainer.train_set.skipped) == 2
    with pytest.raises(InputError, match=r"broken.jsonl:44: not valid JSON"):
        Trainer(make_config(data=str(broken), strict_data=True, output=str(tmp_path / "strict")))


def test_gradient_checkpointing_runs(make_config):
    result = run_training(make_config(text=TowerTraining("full", grad_checkpointing=True), epochs=1))
    assert result.steps == 4


def test_train_and_eval_commands(make_config, tmp_path, tiny_bert_dir, colour_data):
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_train_config(tiny_bert_dir, val_size=14, batch_size=7, warmup_steps=2, workers=0,
                                                   head_lr=0.01, log_every=1)))
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--config", str(config), "--data", str(colour_data), "--epochs", "20",
                                 "-o", str(tmp_path / "cli-run"), "--set", "seed=1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "trained 80 steps" in result.stdout and "start" in result.stdout and "best" in result.stdout
    saved = json.loads((tmp_path / "cli-run" / "train_config.json").read_text())
    assert saved["epochs"] == 20 and saved["seed"] == 1 and saved["model"]["embed_dim"] == 16

    result = runner.invoke(cli, ["eval", "--model", str(tmp_path / "cli-run" / "best"), "--data", str(colour_data),
                                 "--json", "--workers", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert set(metrics) == {"t2i", "i2t"}
    for direction in metrics.values():
        assert {"R@1", "R@5", "R@10", "median_rank"} == set(direction)
        assert 0 <= direction["R@1"] <= direction["R@5"] <= direction["R@10"] <= 100

    table = runner.invoke(cli, ["eval", "--model", str(tmp_path / "cli-run" / "best"), "--data", str(colour_data),
                                "--workers", "0"])
    assert "42 images, 126 captions" in table.stdout and "t2i" in table.stdout

    again = runner.invoke(cli, ["train", "--config", str(config), "--data", str(colour_data),
                                "-o", str(tmp_path / "cli-run")])
    assert again.exit_code != 0 and "already holds a run; pass --resume" in again.output


def test_train_without_data_is_one_sentence(tmp_path):
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    out = tmp_path / "never-written"  # inside this test's folder: parallel runs must not share one path
    result = CliRunner().invoke(cli, ["train", "-o", str(out)])
    assert result.exit_code != 0 and "no training data: give --data FILE" in result.output
    assert not out.exists()  # refused before anything is written


# -- kills, Ctrl-C and resuming (issue 13) ------------------------------------------------------

def interrupt_at(monkeypatch, step: int) -> None:
    original_report = Trainer._report

    def report(self, bar, window):
        original_report(self, bar, window)
        if self.state["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_report", report)


def test_resume_after_a_kill_finds_the_checkpoint_and_logs_each_step_once(make_config, tmp_path, monkeypatch):
    from mmretrieve.train.loop import TrainingInterrupted

    run = tmp_path / "killed"
    interrupt_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted) as interrupted:
        run_training(make_config(output=str(run)))
    assert interrupted.value.step == 3 and interrupted.value.checkpoint == run / "checkpoint"
    monkeypatch.undo()
    # What a SIGKILL between atomic_directory's renames leaves: no checkpoint/, the state aside.
    (run / "checkpoint").rename(run / ".checkpoint.new-4194000-abcdefgh")
    # and what the killed run had logged after its checkpoint, the last line cut short.
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + json.dumps({"step": 5, "loss": 1.0}) + "\n")
        handle.write('{"step": 6, "lo')
    resumed = Trainer(make_config(output=str(run)), resume=True).train()
    assert resumed.steps == 8
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, 9))
    val_steps = [r["step"] for r in records if "val" in r]
    assert len(val_steps) == len(set(val_steps))


def test_ctrl_c_during_train_says_where_the_checkpoint_is_and_how_to_resume(make_config, tmp_path, tiny_bert_dir,
                                                                            colour_data, monkeypatch):
    import shlex

    from click.testing import CliRunner

    from mmretrieve.cli import cli

    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_train_config(tiny_bert_dir, val_size=14, batch_size=7, warmup_steps=2, workers=0,
                                                   log_every=1)))
    run = tmp_path / "cli-run"
    interrupt_at(monkeypatch, 2)
    args = ["train", "--config", str(config), "--data", str(colour_data), "--epochs", "2", "-o", str(run)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130, result.output
    assert "Aborted" not in result.output
    note = result.stderr.strip().splitlines()[-1]
    assert note.startswith(f"Interrupted: the checkpoint of step 2 is saved in {run / 'checkpoint'}; resume with: ")
    command = shlex.split(note.split("resume with: ")[1])
    assert command[:2] == ["mmretrieve", "train"] and command[-1] == "--resume"
    monkeypatch.undo()
    resumed = CliRunner().invoke(cli, command[1:], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "trained 8 steps" in resumed.stdout


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(make_config, tmp_path, colour_data, monkeypatch):
    from click.testing import CliRunner

    from mmretrieve.cli import cli

    def interrupted(config, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr("mmretrieve.train.loop.run_training", interrupted)
    result = CliRunner().invoke(cli, ["train", "--data", str(colour_data), "--text-encoder", "bert",
                                      "-o", str(tmp_path / "run")])
    assert result.exit_code == 130
    assert "Interrupted before the first checkpoint, so nothing was saved" in result.stderr


def test_train_without_a_model_starts_from_the_offline_default(tmp_path, colour_data, monkeypatch):
    from click.testing import CliRunner

    from mmretrieve.cli import cli
    from mmretrieve.plugins import get_host
    from mmretrieve.train.loop import TrainResult

    if "default" not in get_host().registry("model"):
        pytest.skip("the offline-towers plugin (which registers `default`) is not installed")
    seen = []

    def record(config, resume=False):
        seen.append(config)
        return TrainResult(config.output, None, None, None, 0, 0, 0.0, False)

    monkeypatch.setattr("mmretrieve.train.loop.run_training", record)
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--data", str(colour_data), "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert seen[-1].init == "default" and "starting from the offline `default` model" in result.stderr
    for chosen in (["--text-encoder", "bert"], ["--init", "runs/other"], ["--set", "model.embed_dim=32"]):
        result = runner.invoke(cli, ["train", "--data", str(colour_data), "-o", str(tmp_path / "b"), *chosen])
        assert result.exit_code == 0, result.output
        assert seen[-1].init == (chosen[1] if chosen[0] == "--init" else None), chosen
        assert "offline `default`" not in result.stderr


def test_hub_ids_fail_fast_with_one_sentence_when_the_hub_cannot_be_reached(monkeypatch):
    from mmretrieve.encoders import create_encoder, hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(InputError, match=r"BERT checkpoint 'mmretrieve-tests/never-cached' is not in the local "
                                         r"model cache .*`--init default`.*`local-dir:PATH`.*HF_HUB_OFFLINE=1"):
        create_encoder("bert", model_name="mmretrieve-tests/never-cached")
    with pytest.raises(InputError, match=r"timm's pretrained 'resnet18' weights is not in the local model cache"):
        create_encoder("timm:resnet18", pretrained=True,
                       model_kwargs={"pretrained_cfg_overlay": {"hf_hub_id": "mmretrieve-tests/never-cached"}})


def test_a_run_killed_before_its_first_checkpoint_starts_over_cleanly(make_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")  # what such a run leaves: its settings and early lines
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "baseline": True, "val": {}}) + "\n" + '{"step": 1, "lo')
    with pytest.raises(ConfigError, match="stopped before its first, so run the command again without --resume"):
        Trainer(make_config(epochs=1), resume=True)
    result = run_training(make_config(epochs=1))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 0 and steps.count(0) == 1 and steps[-1] == result.steps
