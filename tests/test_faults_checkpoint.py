"""Checkpoint faults (issue 27): planted pickles never run, damaged checkpoints are skipped by name,
resumes that change the run are refused, and nothing is silently lost on resume.

Unit tests build checkpoint folders by hand; the integration tests train a tiny random model for a
few steps and then damage, plant or change what a user (or an attacker) could.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from oapl.cli.main import main
from oapl.errors import UserError
from oapl.metrics import MetricsLogger
from oapl.rundir import check_resume_config
from oapl.trainer import checkpoint as ck
from oapl.trainer.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_trainer_state,
    resume_checkpoint,
    verify_checkpoint,
    write_manifest,
    write_trainer_state,
)

HERE = Path(__file__).parent


class Planted:
    """An object whose unpickling runs a shell command (what an attacker puts in a checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def fake_checkpoint(root: Path, step: int, weights: bytes = b"w" * 4096) -> Path:
    """A checkpoint folder in today's format with a real trainer state and a manifest."""
    p = root / "checkpoints" / f"step-{step:08d}"
    (p / "model").mkdir(parents=True)
    (p / "model" / "config.json").write_text('{"model_type": "llama"}')
    (p / "model" / "model.safetensors").write_bytes(weights)
    write_trainer_state(p, {"step": step, "policy": {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}}})
    (p / "config.yaml").write_text("steps: 10\n")
    write_manifest(p, step, "single")
    return p


# -- no code runs from a checkpoint ----------------------------------------------------------------
def test_trainer_state_round_trips_through_json_and_safetensors(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 3)).sum().backward()
    opt.step()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = {
        "step": 7,
        "version_steps": {0: 0, 3: 6},
        "eval_before": None,
        "checkpoints": ["a"],
        "policy": {"optimizer": opt.state_dict()},
        "rng": ck.rng_state(),
    }
    write_trainer_state(tmp_path, state)
    assert sorted(os.listdir(tmp_path)) == ["trainer_state.json", "trainer_state.safetensors"]
    back = load_trainer_state(tmp_path)
    assert back["step"] == 7 and back["version_steps"] == {0: 0, 3: 6} and back["checkpoints"] == ["a"]
    saved = opt.state_dict()
    assert back["policy"]["optimizer"]["param_groups"] == saved["param_groups"]  # tuples (betas) come back
    for i, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(back["policy"]["optimizer"]["state"][i][k], v)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ck.set_rng_state(back["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_planted_pickle_in_an_old_format_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    (ckpt / "model").mkdir(parents=True)
    torch.save({"step": 2, "rng": Planted(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError) as err:
        load_trainer_state(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and str(ckpt / "trainer_state.pt") in msg and "posix.system" in msg
    assert not marker.exists()


def test_old_format_checkpoint_without_objects_loads_with_weights_only(tmp_path):
    """oapl's own older checkpoints (NumPy's RNG array inside) still load, by the restricted unpickler."""
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    torch.save(
        {"step": 1, "rng": ck.rng_state(), "policy": {"scheduler": {"last_epoch": 1}}}, ckpt / "trainer_state.pt"
    )
    state = load_trainer_state(ckpt)
    assert state["step"] == 1 and isinstance(state["rng"]["numpy"][1], np.ndarray)


def test_planted_pickle_in_dcp_metadata_never_runs(tmp_path):
    from oapl.distributed.sharded import read_dcp_metadata

    marker = tmp_path / "pwned"
    optim = tmp_path / "optim"
    optim.mkdir()
    (optim / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: holds pickled objects \(posix\.system\)"):
        read_dcp_metadata(optim)
    assert not marker.exists()


def test_real_dcp_metadata_passes_the_restricted_reader(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from oapl.distributed.sharded import load_optimizer, read_dcp_metadata

    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 3)).sum().backward()
    opt.step()
    dcp.save({"optim": get_optimizer_state_dict(m, opt)}, checkpoint_id=str(tmp_path), no_dist=True)
    assert isinstance(read_dcp_metadata(tmp_path), Metadata)
    m.zero_grad(set_to_none=True)  # as in a resumed process (DCP initialises the states of grad-less params)
    opt2 = torch.optim.AdamW(m.parameters())
    load_optimizer(m, opt2, tmp_path)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# -- the manifest ---------------------------------------------------------------------------------
def test_manifest_lists_every_file_and_verifies(tmp_path):
    p = fake_checkpoint(tmp_path, 1)
    manifest = json.loads((p / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "model/config.json",
        "model/model.safetensors",
        "trainer_state.json",
        "trainer_state.safetensors",
        "config.yaml",
    }
    assert manifest["files"]["model/model.safetensors"]["size"] == 4096
    assert verify_checkpoint(p) is None


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda p: shutil.rmtree(p / "model"), "model/ is missing"),
        (lambda p: (p / "trainer_state.safetensors").unlink(), "trainer_state.safetensors is missing"),
        (
            lambda p: os.truncate(p / "model" / "model.safetensors", 100),
            "model/model.safetensors is 100 bytes, the manifest says 4096",
        ),
        (lambda p: (p / "config.yaml").write_text("steps: 11\n"), "config.yaml does not match its checksum"),
        (lambda p: (p / "manifest.json").write_text("{half"), "manifest.json is unreadable"),
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (
            lambda p: (p / "manifest.json").write_text(json.dumps({"files": {"../../x": {"size": 1}}})),
            "manifest.json lists a path outside the checkpoint (../../x)",
        ),
    ],
)
def test_damage_is_named(tmp_path, damage, why):
    p = fake_checkpoint(tmp_path, 1)
    damage(p)
    assert why in verify_checkpoint(p)


def test_large_files_are_checked_by_sampled_blocks(tmp_path, monkeypatch):
    """Files over FULL_HASH_BYTES: size + SHA-256 of SAMPLE_BLOCKS blocks; damage in a sampled block shows."""
    monkeypatch.setattr(ck, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(ck, "BLOCK_BYTES", 64)
    p = fake_checkpoint(tmp_path, 1, weights=bytes(range(256)) * 64)  # 16384 bytes
    entry = json.loads((p / "manifest.json").read_text())["files"]["model/model.safetensors"]
    assert "sampled_sha256" in entry and "sha256" not in entry
    # the blocks start at (16384 - 64) * i // 15: block 7 covers bytes 7616..7679
    data = bytearray((p / "model" / "model.safetensors").read_bytes())
    data[7620] ^= 0xFF
    (p / "model" / "model.safetensors").write_bytes(bytes(data))
    assert verify_checkpoint(p) == "model/model.safetensors does not match its checksum"


def test_resume_takes_the_newest_intact_checkpoint_and_names_the_skipped(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    good = fake_checkpoint(tmp_path, 4)
    bad = fake_checkpoint(tmp_path, 6)
    shutil.rmtree(bad / "model")
    worse = fake_checkpoint(tmp_path, 8)
    os.truncate(worse / "trainer_state.safetensors", 10)
    with caplog.at_level(logging.WARNING, logger="oapl.trainer.checkpoint"):
        assert resume_checkpoint(tmp_path) == good
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert skipped == [
        "skipping damaged checkpoint checkpoints/step-00000008: trainer_state.safetensors is 10 bytes, "
        "the manifest says "
        + str(json.loads((worse / "manifest.json").read_text())["files"]["trainer_state.safetensors"]["size"])
        + " (truncated or replaced)",
        "skipping damaged checkpoint checkpoints/step-00000006: model/ is missing",
    ]


def test_old_format_checkpoints_are_checked_too(tmp_path, caplog):
    """No manifest (an older oapl): model/ and a readable trainer_state.pt; a truncated one is skipped."""
    for step in (2, 4):
        p = tmp_path / "checkpoints" / f"step-{step:08d}"
        (p / "model").mkdir(parents=True)
        (p / "model" / "config.json").write_text("{}")
        torch.save({"step": step, "rng": ck.rng_state()}, p / "trainer_state.pt")
    latest = tmp_path / "checkpoints" / "step-00000004"
    os.truncate(latest / "trainer_state.pt", (latest / "trainer_state.pt").stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="oapl.trainer.checkpoint"):
        assert resume_checkpoint(tmp_path).name == "step-00000002"
    assert "step-00000004: trainer_state.pt is damaged (truncated?)" in caplog.text
    assert load_trainer_state(tmp_path / "checkpoints" / "step-00000002")["step"] == 2


def test_every_checkpoint_damaged_is_refused_naming_each(tmp_path):
    for step in (1, 2):
        shutil.rmtree(fake_checkpoint(tmp_path, step) / "model")
    with pytest.raises(
        CheckpointError,
        match=r"no intact checkpoint.*step-00000002 \(model/ is missing\); "
        r"step-00000001 \(model/ is missing\)",
    ):
        resume_checkpoint(tmp_path)


def test_a_named_checkpoint_is_used_or_refused(tmp_path):
    old = fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    assert resume_checkpoint(tmp_path, str(old)) == old
    shutil.rmtree(old / "model")
    with pytest.raises(CheckpointError, match="damaged checkpoint .model/ is missing"):
        resume_checkpoint(tmp_path, str(old))
    with pytest.raises(CheckpointError, match="no such checkpoint; kept ones: step-00000002, step-00000004"):
        resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-00000003"))


# -- a resume keeps the run what it was -------------------------------------------------------------
def _stored_run(tmp_path: Path, **changes) -> Path:
    from oapl.config import TrainConfig, save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(output_dir=str(run)), run / "config.yaml")
    return run


def _cfg(run: Path, **dotted):
    from oapl.config import TrainConfig

    tree = TrainConfig(output_dir=str(run)).model_dump(mode="json")
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return TrainConfig.model_validate(tree)


def test_resume_refuses_a_change_to_the_run_listing_the_fields(tmp_path):
    run = _stored_run(tmp_path)
    cfg = _cfg(run, algorithm__name="grpo", rollout__group_size=4, model__name="other/model", algorithm__beta2=0.5)
    with pytest.raises(UserError) as err:
        check_resume_config(cfg)
    msg = str(err.value)
    assert msg.startswith("algorithm.beta2, algorithm.name, model.name, rollout.group_size: cannot change")
    assert "was 'oapl', now 'grpo'" in msg and "\n" not in msg
    for field in ("task__dataset", "sampling__temperature"):
        with pytest.raises(UserError, match=field.replace("__", ".")):
            check_resume_config(_cfg(run, **{field: "x.jsonl" if "dataset" in field else 0.5}))


def test_resume_allows_longer_runs_and_other_cadences(tmp_path, caplog):
    run = _stored_run(tmp_path)
    cfg = _cfg(
        run,
        steps=500,
        logging__log_samples_every=5,
        logging__progress=False,
        checkpoint__every=10,
        checkpoint__keep=4,
        eval__every=20,
        task__reward_timeout_s=9.0,
    )
    with caplog.at_level(logging.WARNING, logger="oapl.rundir"):
        check_resume_config(cfg)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "steps (100 -> 500)" in line and "checkpoint.every (0 -> 10)" in line


# -- nothing lost on resume ------------------------------------------------------------------------
def test_garbled_metrics_lines_are_kept_aside_with_a_warning(tmp_path, caplog):
    rows = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (1, 2, 3)]
    text = "\n".join([rows[0], '{"step": 2, "lo', rows[1], "\x00\x00garbage", "42", rows[2]]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text)
    logger = MetricsLogger(tmp_path, resume=True)
    with caplog.at_level(logging.WARNING, logger="oapl.metrics"):
        logger.truncate_after(2)
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == rows[0] + "\n" + rows[1] + "\n"
    aside = (tmp_path / "metrics.garbled.jsonl").read_text().splitlines()
    assert aside == ['{"step": 2, "lo', "\x00\x00garbage", "42"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "3 garbled line(s)" in line and "metrics.garbled.jsonl" in line


# -- integration: a real run, damaged, planted and changed -----------------------------------------
@pytest.fixture
def _toy_rewards(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a damaged model/ must never become a Hub lookup


def train_argv(tiny_model_dir, prompts_file, out, *extra):
    return [
        "train",
        f"output_dir={out}",
        f"model.name={tiny_model_dir}",
        "task.name=dataset",
        f"task.dataset={prompts_file}",
        "task.columns={prompt: question, prompt_id: id}",
        "task.reward=toy_rewards:digit_fraction",
        "engine.kind=transformers",
        "steps=3",
        "threads=2",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "rollout.prompts_per_generate=2",
        "rollout.asynchronous=false",
        "sampling.max_tokens=4",
        "eval.at_start=false",
        "eval.at_end=false",
        "logging.progress=false",
        "checkpoint.every=1",
        "checkpoint.keep=3",
        *extra,
    ]


def oapl_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("oapl: ")]


@pytest.mark.slow
def test_damaged_latest_checkpoint_planted_pickle_and_changed_config(
    _toy_rewards, capsys, tmp_path, tiny_model_dir, prompts_file
):
    run = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, prompts_file, run)) == 0
    kept = [str(p) for p in list_checkpoints(run)]
    assert [Path(p).name for p in kept] == ["step-00000001", "step-00000002", "step-00000003"]
    assert yaml.safe_load((run / "summary.yaml").read_text())["checkpoints"] == kept
    capsys.readouterr()

    # a changed algorithm is refused before anything loads; config.yaml stays the first run's
    stored = (run / "config.yaml").read_text()
    assert main(train_argv(tiny_model_dir, prompts_file, run, "algorithm.name=grpo", "--resume")) == 2
    (line,) = oapl_lines(capsys.readouterr().err)
    assert line.startswith("oapl: algorithm.name: cannot change when resuming")
    assert (run / "config.yaml").read_text() == stored

    # the newest checkpoint lost its model/: skipped by name, the run resumes from step 2
    shutil.rmtree(run / "checkpoints" / "step-00000003" / "model")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss"')  # a row cut short
    assert main(train_argv(tiny_model_dir, prompts_file, run, "steps=4", "--resume")) == 0
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint checkpoints/step-00000003: model/ is missing" in err
    assert "resuming from checkpoints/step-00000002" in err
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (run / "metrics.garbled.jsonl").read_text() == '{"step": 4, "loss"\n'
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000003", "step-00000004"]
    assert verify_checkpoint(run / "checkpoints" / "step-00000003") is None  # rewritten whole by the resumed run

    # a planted pickle in an old-format latest checkpoint: refused in one line, nothing runs
    marker = tmp_path / "pwned"
    latest = run / "checkpoints" / "step-00000004"
    for name in ("manifest.json", "trainer_state.json", "trainer_state.safetensors"):
        (latest / name).unlink()
    torch.save({"step": 4, "rng": Planted(marker)}, latest / "trainer_state.pt")
    assert main(train_argv(tiny_model_dir, prompts_file, run, "steps=5", "--resume")) == 2
    (line,) = oapl_lines(capsys.readouterr().err)
    assert str(latest / "trainer_state.pt") in line and "pickled objects" in line
    assert not marker.exists()


def test_sharded_layout_has_a_manifest_and_a_damaged_one_is_skipped(tiny_model_dir, prompts_file, tmp_path, caplog):
    """The FSDP2 layout (written here by one rank): rank 0's manifest lists the optimiser shards too."""
    from conftest import tiny_config
    from test_precision import _groups

    import oapl.distributed.sharded as sharded
    from oapl.trainer.policy import Policy, load_policy

    cfg = tiny_config(tiny_model_dir, prompts_file, tmp_path / "run", **{"task.reward": "toy_rewards:digit_fraction"})
    policy = Policy(cfg, total_steps=6)
    policy.train_step(_groups(0))
    first = sharded.save_sharded_checkpoint(tmp_path / "run", 1, policy, 0, 1, {"step": 1}, "{}", keep=3)
    policy.train_step(_groups(1))
    second = sharded.save_sharded_checkpoint(tmp_path / "run", 2, policy, 0, 1, {"step": 2}, "{}", keep=3)
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["layout"] == "sharded/1"
    assert {"optim/.metadata", "optim/__0_0.distcp", "trainer_state.json", "model/model.safetensors.index.json"} <= set(
        manifest["files"]
    )
    assert verify_checkpoint(second) is None
    (second / "optim" / "__0_0.distcp").unlink()
    with caplog.at_level(logging.WARNING, logger="oapl.trainer.checkpoint"):
        assert resume_checkpoint(tmp_path / "run") == first
    assert "skipping damaged checkpoint checkpoints/step-00000002: optim/__0_0.distcp is missing" in caplog.text
    _, state = load_policy(cfg, 6, first)
    assert state["step"] == 1 and state["world"] == 1


@pytest.mark.slow
def test_trainer_resumes_from_any_kept_checkpoint_and_lora_saves_peft_layout(tiny_model_dir, tmp_path):
    """``resume_from_checkpoint=<path>`` takes any kept checkpoint of the run (TRL's meaning); a LoRA
    checkpoint holds peft's files at its root and ``save_model`` exports the merged model from it."""
    from peft import LoraConfig
    from safetensors.torch import load_file
    from test_api import _args, _rows

    from oapl.api import OAPLTrainer

    def reward(prompts, completions, **kw):
        return [float("7" in c) for c in completions]

    out = tmp_path / "run"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    def trainer(steps):
        return OAPLTrainer(
            tiny_model_dir,
            reward_funcs=reward,
            train_dataset=_rows(),
            peft_config=lora,
            args=_args(out, max_steps=steps, save_steps=1, save_total_limit=3, weight_sync_steps=1),
        )

    trainer(3).train()
    kept = list_checkpoints(out)
    assert [p.name for p in kept] == ["step-00000001", "step-00000002", "step-00000003"]
    assert all((p / "adapter_config.json").is_file() and not (p / "model").exists() for p in kept)
    third = load_file(str(kept[2] / "adapter_model.safetensors"))
    again = trainer(3)
    assert again.train(resume_from_checkpoint=str(kept[0])).global_step == 3
    steps = [
        json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(ln)
    ]
    assert steps == [1, 2, 3]  # the rows of steps 2-3 were written again, once
    redone = load_file(str(kept[2] / "adapter_model.safetensors"))
    assert set(redone) == set(third)
    for k in third:  # the counters, data order and RNG came back: steps 2-3 are the same steps again
        assert torch.equal(redone[k], third[k]), k
    with pytest.raises(
        UserError,
        match=r"not a checkpoint of this run; kept ones in .*step-00000001, "
        r"step-00000002, step-00000003",
    ):
        trainer(3).train(resume_from_checkpoint=str(tmp_path / "elsewhere" / "step-00000001"))
    # save_model as TRL's: peft's layout at the root, which PeftModel loads onto the base model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = Path(again.save_model(tmp_path / "final"))
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    assert (saved / "tokenizer_config.json").is_file() and not (saved / "model.safetensors").exists()
    assert not (kept[2] / "model").exists()  # nothing merged was needed
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(saved))
    assert sum("lora_" in n for n, _ in peft_model.named_parameters()) > 0
    # merged=True: the export (a plain Hugging Face folder), written from the checkpoint once, on demand
    merged = Path(again.save_model(tmp_path / "merged", merged=True))
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert (kept[2] / "model" / "config.json").is_file()
