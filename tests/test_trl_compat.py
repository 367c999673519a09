"""TRL compatibility outside reward calling (issue 28): TrainerCallbacks, OAPLConfig as a TRL config,
TRL's defaults and metric names, failed starts, launchers, push_to_hub, and a TRL script ported by
changing its import and two class names."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oapl import OAPLConfig, OAPLTrainer
from oapl.config import ConfigError
from oapl.errors import UserError

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _args(out, **over):
    base = dict(
        output_dir=str(out),
        max_steps=4,
        learning_rate=1e-2,
        num_generations=4,
        per_device_train_batch_size=16,
        max_completion_length=6,
        weight_sync_steps=2,
        seed=0,
        use_vllm=False,
        disable_tqdm=True,
        threads=2,
        rollout={"asynchronous": False, "prompts_per_generate": 4},
        model={"logprob_chunk_size": 16},
        task={"system_prompt": None},
    )
    base.update(over)
    return OAPLConfig(**{k: v for k, v in base.items() if v is not None})


def _rows(n=16):
    return [{"prompt": f"say {i}", "answer": i} for i in range(n)]


# -- OAPLConfig: TRL's defaults and meanings ----------------------------------------------------------
def test_unset_batch_names_give_trls_8_completions_per_step():
    cfg = OAPLConfig()
    # TRL: per_device_train_batch_size=8 x gradient_accumulation_steps=1 = 8 completions = 1 prompt of G=8
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.optim.micro_batch_size) == (8, 1, 8)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.generation_batch_size) == (8, 1, 8)
    assert OAPLConfig(num_generations=4).rollout.prompts_per_step == 2
    assert OAPLConfig(gradient_accumulation_steps=4).rollout.prompts_per_step == 4  # 8 x 4 / 8
    # oapl's own nested field still wins over TRL's default
    assert OAPLConfig(rollout={"prompts_per_step": 3}).rollout.prompts_per_step == 3
    with pytest.raises(
        ConfigError,
        match=r"8 x 1 = 8 completions per step \(TRL's defaults, as neither is given\) "
        r"is not a multiple of num_generations = 16",
    ):
        OAPLConfig(num_generations=16)
    # TRL's linear decay and logging cadence when unset; constant / cosine when asked for
    assert (cfg.optim.schedule, cfg.logging_steps, cfg.lr_scheduler_type) == ("linear", 10, "linear")
    assert OAPLConfig(lr_scheduler_type="constant").optim.schedule == "constant"
    assert OAPLConfig(optim={"schedule": "cosine"}).optim.schedule == "cosine"
    # logging_steps sets the on_log cadence; samples.jsonl only with log_completions, as TRL
    assert OAPLConfig(logging_steps=5).logging.log_samples_every == 0
    assert OAPLConfig(logging_steps=5, log_completions=True).logging.log_samples_every == 5


def test_linear_schedule_decays_to_zero_after_warmup_as_transformers():
    import torch
    from transformers import get_linear_schedule_with_warmup

    from oapl.config import OptimConfig
    from oapl.trainer.optim import lr_lambda

    fn = lr_lambda(OptimConfig(schedule="linear"), 4)
    assert [fn(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # after the warm-up, the same multipliers as transformers' own schedule (oapl's warm-up starts at 1/w, not 0)
    fn = lr_lambda(OptimConfig(schedule="linear", warmup_steps=2), 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(opt, 2, 10).lr_lambdas[0]
    assert [fn(s) for s in range(2, 11)] == pytest.approx([ref(s) for s in range(2, 11)], abs=1e-12)
    assert [fn(0), fn(1)] == [0.5, 1.0]


def test_trl_names_can_be_set_after_construction():
    cfg = OAPLConfig(output_dir="a", max_steps=3, num_generations=4)
    cfg.max_steps, cfg.seed, cfg.output_dir, cfg.learning_rate = 8, 7, "b", 3e-5
    assert (cfg.steps, cfg.seed, cfg.output_dir, cfg.optim.lr) == (8, 7, "b", 3e-5)
    cfg.per_device_train_batch_size = 16  # 16 x 1 completions = 4 prompts of G=4
    assert (cfg.optim.micro_batch_size, cfg.rollout.prompts_per_step) == (16, 4)
    cfg.gradient_accumulation_steps = 2
    assert cfg.rollout.prompts_per_step == 8 and cfg.gradient_accumulation_steps == 2
    cfg.save_steps = 0.5  # a share of max_steps, as at construction
    cfg.lr_scheduler_type = "cosine"
    cfg.use_vllm = False
    assert (cfg.checkpoint.every, cfg.optim.schedule, cfg.engine.kind) == (4, "cosine", "transformers")
    assert cfg.to_train_config().steps == 8  # what the run reads
    with pytest.raises(ConfigError, match="beta=0.04 is not supported"):
        cfg.beta = 0.04
    with pytest.raises(ConfigError, match="lr_scheduler_type='polynomial' is not supported"):
        cfg.lr_scheduler_type = "polynomial"


def test_hf_argument_parser_and_trl_parser_parse_oapl_config(tmp_path):
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(OAPLConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "runs/x",
            "--max_steps",
            "7",
            "--learning_rate",
            "2e-5",
            "--num_generations",
            "4",
            "--use_vllm",
            "false",
            "--algorithm.beta2",
            "0.05",
            "--lr_scheduler_type",
            "cosine",
        ],
        look_for_args_file=False,
    )
    assert isinstance(cfg, OAPLConfig)
    assert (cfg.output_dir, cfg.steps, cfg.optim.lr, cfg.rollout.group_size) == ("runs/x", 7, 2e-5, 4)
    assert (cfg.engine.kind, cfg.algorithm.beta2, cfg.optim.schedule, cfg.rollout.prompts_per_step) == (
        "transformers",
        0.05,
        "cosine",
        2,
    )  # unset names keep TRL's defaults: 8 completions = 2 prompts of 4
    (same,) = HfArgumentParser(OAPLConfig).parse_dict({"output_dir": "runs/x", "max_steps": 7})
    assert same.steps == 7 and same.seed == OAPLConfig().seed
    trl = pytest.importorskip("trl")
    from trl import ModelConfig, ScriptArguments

    yml = tmp_path / "cfg.yaml"
    yml.write_text("dataset_name: x\noutput_dir: runs/y\nper_device_train_batch_size: 16\nnum_generations: 4\n")
    script, cfg, model = trl.TrlParser((ScriptArguments, OAPLConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(yml), "--max_steps", "3"]
    )
    assert (cfg.output_dir, cfg.rollout.prompts_per_step, cfg.steps, script.dataset_name) == ("runs/y", 4, 3, "x")


def test_one_table_of_trl_names():
    from oapl.trl_config import TRL_FIELDS, TRL_NOOP, TRL_TABLE

    assert set(TRL_TABLE) == set(TRL_FIELDS) | set(TRL_NOOP) and not set(TRL_FIELDS) & set(TRL_NOOP)
    # every TRL name reads back from an OAPLConfig
    cfg = OAPLConfig()
    for name in TRL_TABLE:
        getattr(cfg, name)
    assert {f.name for f in dataclasses.fields(OAPLConfig)} >= set(TRL_TABLE)


def test_a_run_too_short_to_sync_warns(caplog):
    from oapl.trl_config import warn_if_never_synced

    with caplog.at_level(logging.WARNING, logger="oapl"):
        assert warn_if_never_synced(OAPLConfig(max_steps=4))  # L = 50 by default
    assert "max_steps=4 <= weight_sync_steps=50" in caplog.text
    assert not warn_if_never_synced(OAPLConfig(max_steps=4, weight_sync_steps=2))


def test_lora_targets_default_to_peft_and_dropped_fields_are_refused(tiny_model_dir):
    peft = pytest.importorskip("peft")
    from oapl.trl_compat import lora_fields

    # target_modules=None: peft's own default for the architecture (Llama: q_proj, v_proj), not all-linear
    assert lora_fields(peft.LoraConfig(r=8), tiny_model_dir)["target_modules"] == ["q_proj", "v_proj"]
    assert (
        lora_fields(peft.LoraConfig(r=8, target_modules="all-linear"), tiny_model_dir)["target_modules"] == "all-linear"
    )
    for kwargs in (
        {"layers_to_transform": [0]},
        {"init_lora_weights": "gaussian"},
        {"rank_pattern": {"q": 4}},
        {"alpha_pattern": {"q": 4}},
        {"use_rslora": True},
        {"bias": "all"},
    ):
        with pytest.raises(UserError, match=f"peft_config: {next(iter(kwargs))}="):
            lora_fields(peft.LoraConfig(r=8, target_modules=["q_proj"], **kwargs), tiny_model_dir)


# -- callbacks, metrics and outputs ---------------------------------------------------------------------
def test_trainer_callbacks_get_trainer_state_and_can_stop_the_run(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback, TrainerControl, TrainerState

    events, seen_logs = [], []

    class Recorder(TrainerCallback):
        def on_init_end(self, args, state, control, **kw):
            events.append(("init_end", state.global_step))

        def on_train_begin(self, args, state, control, **kw):
            assert isinstance(state, TrainerState) and isinstance(control, TrainerControl)
            events.append(("train_begin", state.max_steps))

        def on_step_begin(self, args, state, control, **kw):
            events.append(("step_begin", state.global_step))

        def on_step_end(self, args, state, control, **kw):
            events.append(("step_end", state.global_step))

        def on_log(self, args, state, control, logs=None, **kw):
            events.append(("log", state.global_step))
            seen_logs.append(dict(logs))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            events.append(("evaluate", state.global_step, sorted(metrics)[:1]))

        def on_save(self, args, state, control, **kw):
            events.append(("save", state.global_step))

        def on_train_end(self, args, state, control, **kw):
            events.append(("train_end", state.global_step))

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True
            return control

    rows = []
    trainer = OAPLTrainer(
        tiny_model_dir,
        reward_funcs="toy_rewards:has_seven",
        train_dataset=_rows(),
        eval_dataset=_rows(2),
        args=_args(tmp_path / "run", logging_steps=1, save_steps=1),
        callbacks=[Recorder(), StopAtTwo, rows.append],
    )
    out = trainer.train()
    assert isinstance(trainer.state, TrainerState) and trainer.state.max_steps == 4
    assert out.global_step == 2 and trainer.state.global_step == 2  # stopped after step 2 of 4
    kinds = [e[0] for e in events]
    assert kinds[0] == "init_end" and ("train_begin", 4) in events and kinds[-1] == "train_end"
    # per step: begin, end, log (logging_steps=1), save (save_steps=1); evaluations before and at the end
    assert [e for e in events if e[0] in ("step_begin", "step_end", "save")] == [
        ("step_begin", 0),
        ("step_end", 1),
        ("save", 1),
        ("step_begin", 1),
        ("step_end", 2),
        ("save", 2),
    ]
    assert [e[1] for e in events if e[0] == "evaluate"] == [0, 2] and [e[2] for e in events if e[0] == "evaluate"] == [
        ["eval_pass@1"]
    ] * 2
    # logs in TRL's names (the window's mean; OAPL's own metrics under theirs), evaluations with eval_ keys
    step_logs = [lg for lg in seen_logs if "loss" in lg]
    assert len(step_logs) == 2
    for lg in step_logs:
        assert {
            "reward",
            "reward_std",
            "learning_rate",
            "completions/mean_length",
            "kl",
            "entropy",
            "lag",
            "epoch",
        } <= set(lg)
        assert "reward_mean" not in lg and "lr" not in lg
    assert step_logs[0]["epoch"] == pytest.approx(4 / 16)  # 4 prompts a step of 16 training rows
    # linear decay over max_steps=4: the lr of step 1 and 2 is 1 and 3/4 of the peak
    assert [lg["learning_rate"] for lg in step_logs] == pytest.approx([1e-2, 0.75e-2], rel=1e-9)
    # a normal end: the final evaluation and the checkpoint of step 2 (the last one saved)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts[-1].endswith("2") and yaml.safe_load((tmp_path / "run" / "summary.yaml").read_text())["steps"] == 2
    # plain functions still get every row, with TRL's names added to oapl's
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all("reward" in r for r in rows if "loss" in r)
    # TrainOutput.metrics as TRL's: no doubled prefix
    assert "eval_seconds" in out.metrics and not any(k.startswith("eval_eval_") for k in out.metrics)
    assert out.metrics["train_loss"] == pytest.approx(out.training_loss)


def test_logging_steps_averages_the_window(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs:
                seen.append((state.global_step, dict(logs)))

    rows = []
    OAPLTrainer(
        tiny_model_dir,
        reward_funcs="toy_rewards:has_seven",
        train_dataset=_rows(),
        args=_args(tmp_path / "run", logging_steps=2, eval_strategy="no"),
        callbacks=[Log(), rows.append],
    ).train()
    steps = [r for r in rows if "loss" in r]
    assert [s for s, _ in seen] == [2, 4]
    for (_, lg), pair in zip(seen, (steps[0:2], steps[2:4])):
        assert lg["loss"] == pytest.approx((pair[0]["loss"] + pair[1]["loss"]) / 2, rel=1e-12, abs=1e-30)
        assert lg["reward"] == pytest.approx((pair[0]["reward_mean"] + pair[1]["reward_mean"]) / 2, rel=1e-12)
        assert lg["lag"] == pair[1]["lag"]  # a counter: the last value


def test_processing_class_as_a_tokenizer_object_with_a_model_path(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = OAPLTrainer(
        tiny_model_dir,
        reward_funcs="toy_rewards:has_seven",
        train_dataset=_rows(),
        args=_args(tmp_path / "run", max_steps=1, eval_strategy="no"),
        processing_class=tok,
    )
    assert Path(trainer.config.model.tokenizer, "tokenizer_config.json").is_file()
    assert trainer.train().global_step == 1


def test_push_to_hub_offline_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    trainer = OAPLTrainer(
        tiny_model_dir, reward_funcs="toy_rewards:has_seven", train_dataset=_rows(), args=_args(tmp_path / "run")
    )
    with pytest.raises(UserError) as err:
        trainer.push_to_hub("someone/model")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("push_to_hub: cannot upload to the Hub repo 'someone/model'")


# -- a failed start, launchers -------------------------------------------------------------------------------
def test_a_failed_start_does_not_block_the_same_call(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed: report_to='tensorboard' does not fail here")
    except ImportError:
        pass
    out = tmp_path / "run"

    def trainer(**over):
        return OAPLTrainer(
            tiny_model_dir,
            reward_funcs="toy_rewards:has_seven",
            train_dataset=_rows(),
            args=_args(out, max_steps=2, eval_strategy="no", **over),
        )

    for _ in range(2):  # the same error again, not "output_dir is not empty"
        with pytest.raises(RuntimeError, match="tensorboard"):
            trainer(report_to="tensorboard").train()
    assert (out / ".oapl-starting").exists()
    assert trainer(report_to="none").train().global_step == 2  # and the fixed call runs
    assert not (out / ".oapl-starting").exists()
    # a run that has trained a step is never taken for a failed start
    with pytest.raises(UserError, match="is not empty"):
        trainer(report_to="none").train()


def test_failed_start_rules(tmp_path):
    from oapl.errors import RunDirError
    from oapl.rundir import begin_run, check_run_dir, failed_start, mark_trained

    run = tmp_path / "run"
    begin_run(run)
    (run / "config.yaml").write_text("x")
    assert failed_start(run)
    check_run_dir(run)  # accepted: only a failed start's files
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not empty \(notes.txt\)"):  # anything else is still refused
        check_run_dir(run)
    (run / "notes.txt").unlink()
    begin_run(run)  # the new run replaces the failed start's files
    assert not (run / "config.yaml").exists() and failed_start(run)
    (run / "config.yaml").write_text("x")
    mark_trained(run)
    assert not failed_start(run)
    with pytest.raises(RunDirError, match="not empty"):
        check_run_dir(run)
    # a checkpoint means a trained run, even with the mark
    (run / ".oapl-starting").touch()
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    assert not failed_start(run)


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "1"}, {"WORLD_SIZE": "4", "RANK": "0"}])
def test_torchrun_and_accelerate_launch_are_refused_in_one_line(env):
    code = (
        "import oapl\n"
        "try:\n    oapl.OAPLTrainer(args=oapl.OAPLConfig(output_dir='x'))\n"
        "except oapl.api.UserError as e:\n    print('ERR', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT / "src")},
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ERR")]
    assert line and f"WORLD_SIZE={env['WORLD_SIZE']} (rank {env['RANK']})" in line[0], proc.stdout + proc.stderr
    assert "distributed.backend=ray" in line[0] and "docs/scaling.md" in line[0]
    from oapl.rundir import refuse_multi_process_launch

    refuse_multi_process_launch()  # one process (no WORLD_SIZE, or 1): runs


# -- a TRL script ported by changing three lines --------------------------------------------------------------
PORT = HERE / "trl_port"


def test_trl_script_ports_by_changing_at_most_three_lines():
    trl_code = (PORT / "trl_script.py").read_text().splitlines()
    oapl_code = (PORT / "oapl_script.py").read_text().splitlines()
    changed = [ln for ln in difflib.ndiff(trl_code, oapl_code) if ln.startswith("+ ")]
    assert 1 <= len(changed) <= 3, changed
    assert any("import" in ln for ln in changed)
    text = "\n".join(oapl_code)
    for feature in (
        "peft_config=",
        "eval_dataset=",
        "callbacks=",
        "save_steps=",
        "logging_steps=",
        "seed=",
        "TrainerCallback",
        "reward_funcs=[",
        '"role": "user"',
    ):
        assert feature in text, feature


@pytest.mark.slow
def test_the_ported_script_runs(tiny_model_dir, tmp_path):
    # as on a machine without vLLM (the tiny model's head_dim=8 is not one vLLM's CPU kernels take):
    # engine.kind=auto then generates with transformers, which is also what TRL's use_vllm=False does
    hide = tmp_path / "no_vllm"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{hide}{os.pathsep}{ROOT / 'src'}",
        "PORT_OUTPUT_DIR": str(tmp_path / "run"),
        "PORT_MODEL": tiny_model_dir,
    }
    proc = subprocess.run(
        [sys.executable, str(PORT / "oapl_script.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DONE global_step=4" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.count("LOG ") == 2  # logging_steps=2 over 4 steps
    assert "EVAL" in proc.stdout and "SAVE" in proc.stdout


def test_oapl_train_takes_trainer_callbacks_too(tiny_model_dir, prompts_file, tmp_path):
    import oapl
    from conftest import tiny_config
    from transformers import TrainerCallback

    seen = []

    class StopAfterOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append((state.global_step, state.max_steps))
            control.should_training_stop = True

    result = oapl.train(tiny_config(tiny_model_dir, prompts_file, tmp_path / "run"), callbacks=[StopAfterOne()])
    assert result.steps == 1 and seen == [(1, 6)]
