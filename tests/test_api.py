"""The Python API (issue 14): OAPLTrainer / OAPLConfig in TRL's shape, in-memory data and rewards, callbacks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import oapl
from oapl import OAPLConfig, OAPLTrainer
from oapl.config import ConfigError, TrainConfig
from oapl.errors import UserError
from oapl.rewards.base import RewardErrorRateError

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def test_import_oapl_is_cheap_and_exports_the_api():
    code = (
        "import sys, oapl; oapl.OAPLConfig; oapl.train; oapl.load_config; oapl.rewards.math_reward; "
        "oapl.rewards.code_reward; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout
    from oapl.api import OAPLTrainer as T
    from oapl.rewards.code import code_reward
    from oapl.rewards.math import math_reward

    assert oapl.OAPLTrainer is T
    assert oapl.rewards.math_reward is math_reward and oapl.rewards.code_reward is code_reward
    assert oapl.load_config(None, ["steps=3"]).steps == 3


# -- OAPLConfig -----------------------------------------------------------------------------------
def test_oapl_config_maps_trl_names_onto_the_nested_fields():
    cfg = OAPLConfig(
        output_dir="runs/x",
        seed=3,
        max_steps=20,
        learning_rate=1e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.01,
        adam_beta1=0.8,
        adam_beta2=0.99,
        adam_epsilon=1e-6,
        max_grad_norm=0,
        num_generations=4,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        generation_batch_size=8,
        max_completion_length=64,
        temperature=0.7,
        use_vllm=False,
        weight_sync_steps=5,
        eval_strategy="steps",
        eval_steps=10,
        eval_on_start=False,
        save_steps=0.25,
        save_total_limit=3,
        logging_steps=5,
        log_completions=True,
        report_to="none",
        gradient_checkpointing=True,
        bf16=False,
        num_generations_eval=4,
        beta=0.0,
        remove_unused_columns=False,
        **{"algorithm.beta2": 1e-2},
    )
    assert isinstance(cfg, TrainConfig)
    assert (cfg.output_dir, cfg.seed, cfg.steps) == ("runs/x", 3, 20)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        1e-5,
        "cosine",
        0.1,
        0.01,
    )
    assert cfg.optim.betas == (0.8, 0.99) and cfg.optim.eps == 1e-6 and cfg.optim.max_grad_norm is None
    # 16 completions per forward/backward x 2 accumulation = 32 completions = 8 prompts of G=4
    assert (cfg.rollout.group_size, cfg.optim.micro_batch_size, cfg.rollout.prompts_per_step) == (4, 16, 8)
    assert cfg.rollout.prompts_per_generate == 2 and cfg.rollout.sync_interval == 5
    assert (cfg.sampling.max_tokens, cfg.sampling.temperature, cfg.engine.kind) == (64, 0.7, "transformers")
    assert (cfg.eval.every, cfg.eval.at_start, cfg.eval.n) == (10, False, 4)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep) == (5, 3)  # 0.25 of 20 steps
    assert cfg.logging.log_samples_every == 5 and not cfg.logging.wandb and not cfg.logging.tensorboard
    assert cfg.model.gradient_checkpointing and cfg.model.compute_dtype == "float32"
    assert cfg.algorithm.beta2 == 1e-2
    # TRL names read (and set) the nested fields
    assert (cfg.learning_rate, cfg.num_generations, cfg.max_steps, cfg.max_completion_length) == (1e-5, 4, 20, 64)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (16, 2)
    cfg.learning_rate = 2e-5
    assert cfg.optim.lr == 2e-5
    # what is written to config.yaml is the plain nested config
    plain = cfg.to_train_config()
    assert type(plain) is TrainConfig and plain.optim.lr == 2e-5
    assert "num_train_epochs" not in plain.model_dump() and "learning_rate" not in plain.model_dump()
    assert OAPLConfig(
        algorithm="grpo", epsilon=0.3, scale_rewards="none", vllm_importance_sampling_correction=False, max_staleness=1
    ).algorithm.model_dump(include={"name", "clip_eps", "scale_advantages", "is_cap"}) == {
        "name": "grpo",
        "clip_eps": 0.3,
        "scale_advantages": False,
        "is_cap": None,
    }
    off = OAPLConfig(eval_strategy="no", save_strategy="no")
    assert (off.eval.every, off.eval.at_start, off.eval.at_end, off.checkpoint.every) == (0, False, False, 0)
    assert off.checkpoint.save_final  # save_model/evaluate read the final checkpoint


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learnig_rate": 1e-5}, "'learnig_rate' is an unknown field; did you mean 'learning_rate'?"),
        ({"lr": 1e-5}, "did you mean 'learning_rate' (optim.lr)?"),
        ({"beta2": 0.1}, "did you mean 'algorithm.beta2'?"),
        ({"sync_interval": 4}, "did you mean 'weight_sync_steps' (rollout.sync_interval)?"),
        ({"optim.lrr": 1.0}, "did you mean 'optim.lr'?"),
        ({"dataloader_num_workers": 2}, "a TRL/transformers training argument with no oapl equivalent"),
        ({"beta": 0.04}, "beta=0.04 is not supported: TRL's KL penalty towards a frozen reference model"),
        ({"top_k": 50}, "top_k=50 is not supported"),
        ({"loss_type": "dr_grpo"}, "algorithm='grpo'"),
        ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type='polynomial' is not supported"),
        ({"learning_rate": -1.0}, "learning_rate (optim.lr): Input should be greater than 0"),
        (
            {"num_generations": 3, "per_device_train_batch_size": 8},
            "8 completions per step is not a multiple of num_generations = 3",
        ),
        ({"learning_rate": 1e-5, "optim": {"lr": 2e-5}}, "both set optim.lr"),
        ({"eval_strategy": "epoch"}, "eval_strategy='epoch' is not supported"),
        ({"report_to": "mlflow"}, "not 'mlflow'"),
        ({"top_p": 0.9}, "sampling.top_p must be 1.0 for OAPL"),
    ],
)
def test_oapl_config_refuses_unknown_and_unsupported_names(kwargs, message):
    with pytest.raises(ConfigError) as err:
        OAPLConfig(**kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)  # as TRL's GRPOConfig raises


def test_docs_table_is_the_code_table():
    from oapl.trl_config import TRL_FIELDS, TRL_NOOP, docs_table

    docs = (ROOT / "docs" / "coming-from-trl.md").read_text()
    assert docs_table() in docs, (
        "regenerate the table: python -c 'from oapl.trl_config import docs_table; print(docs_table())'"
    )
    for name in (
        "learning_rate",
        "num_generations",
        "max_completion_length",
        "temperature",
        "per_device_train_batch_size",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "output_dir",
        "seed",
    ):
        assert name in TRL_FIELDS
    # every name is a real TRL name (GRPOConfig, AsyncGRPOConfig or transformers' TrainingArguments)
    import dataclasses

    trl = pytest.importorskip("trl")
    from trl.experimental.async_grpo import AsyncGRPOConfig

    real = {f.name for cls in (trl.GRPOConfig, AsyncGRPOConfig) for f in dataclasses.fields(cls)}
    real |= {"max_prompt_length", "overwrite_output_dir", "warmup_ratio"}  # TRL < 1.0 / transformers < 5 scripts
    assert set(TRL_FIELDS) - real == set()
    assert set(TRL_NOOP) - real == set()


# -- the trainer ------------------------------------------------------------------------------------
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
    return [{"prompt": f"say {i}", "answer": i, "extra": f"x{i}"} for i in range(n)]


def test_trainer_with_in_memory_data_rewards_and_callbacks(tiny_model_dir, tmp_path):
    seen_columns = []

    def sevens(prompts, completions, answer, extra, **kw):  # defined here: only in memory
        seen_columns.append((len(completions), answer[0], extra[0]))
        return [c.count("7") / max(1, len(c)) for c in completions]

    rows = []
    trainer = OAPLTrainer(
        tiny_model_dir,
        reward_funcs=[sevens, "toy_rewards:has_seven"],
        reward_weights=[1.0, 0.5],
        train_dataset=_rows(),
        eval_dataset=_rows(4),
        args=_args(tmp_path / "run"),
        callbacks=[rows.append],
    )
    out = trainer.train()
    assert out.global_step == 4 and trainer.state.global_step == 4
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # every step's metrics row, as logged
    assert all("reward_mean" in r and "kl" in r for r in steps)
    assert any("eval/pass@1" in r for r in rows)
    assert all(r["reward"] == r["reward_mean"] and r["learning_rate"] == r["lr"] for r in steps)  # TRL's names too
    # log_history as TRL's: every logging_steps (10, TRL's default: none in 4 steps), evaluations, the summary
    history = trainer.state.log_history
    assert [h["step"] for h in history if "eval_pass@1" in h] == [0, 4]
    assert not any("loss" in h for h in history) and history[-1]["train_loss"] == out.training_loss
    assert out.training_loss == pytest.approx(sum(r["loss"] for r in steps) / 4)
    assert "eval_pass@1" in out.metrics
    # one test call on the first row before the model loads (1 completion), then one call per engine
    # call (4 prompts x G=4) and per held-out batch (4 prompts x 1), columns aligned
    assert seen_columns[0][0] == 1 and {n for n, _, _ in seen_columns[1:]} == {16, 4}
    # TRL's per-function metrics; with no None and no failure the weighted sum of their means is the mean reward
    for r in steps:
        assert r["reward_mean"] == pytest.approx(
            r["rewards/sevens/mean"] + 0.5 * r["rewards/has_seven/mean"], rel=1e-9, abs=1e-12
        )
        assert r["rewards/has_seven/std"] >= 0.0
    assert all(extra == f"x{answer}" for _, answer, extra in seen_columns)
    # config.yaml says where data and rewards came from
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["task"]
    assert saved["name"] == "dataset"
    assert saved["dataset"].startswith("<in-memory:train_dataset:n=16:sha256=")
    assert saved["eval_dataset"].startswith("<in-memory:eval_dataset:n=4:sha256=")
    assert saved["reward"] == ["<in-memory:reward:sevens>", "toy_rewards:has_seven"]
    assert saved["reward_weights"] == [1.0, 0.5]
    # evaluate(): the run's final evaluation, or the trained model on other prompts
    assert trainer.evaluate()["eval_pass@1"] == out.metrics["eval_pass@1"]
    other = trainer.evaluate(eval_dataset=_rows(3), metric_key_prefix="test")
    assert other["test_prompts"] == 3.0 and "test_pass@1" in other
    # save_model(): a Hugging Face folder of the trained weights
    saved_dir = Path(trainer.save_model(tmp_path / "final"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved_dir)
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "model"
    ref = AutoModelForCausalLM.from_pretrained(ckpt)
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert (a == b).all(), name
    assert (saved_dir / "tokenizer_config.json").exists()


def test_resume_accepts_the_same_in_memory_data_and_refuses_other(tiny_model_dir, tmp_path):
    def reward(prompts, completions, **kw):
        return [float("7" in c) for c in completions]

    out = tmp_path / "run"
    OAPLTrainer(tiny_model_dir, reward_funcs=reward, train_dataset=_rows(), args=_args(out, max_steps=2)).train()
    # the same rows (another list object, same content): accepted, continues to step 4
    again = OAPLTrainer(tiny_model_dir, reward_funcs=reward, train_dataset=_rows(), args=_args(out, max_steps=4))
    assert again.train(resume_from_checkpoint=True).global_step == 4
    other = OAPLTrainer(tiny_model_dir, reward_funcs=reward, train_dataset=_rows(15), args=_args(out, max_steps=6))
    with pytest.raises(UserError, match=r"task.dataset: resuming .* with other data or rewards.*n=16.*n=15"):
        other.train(resume_from_checkpoint=True)
    # without resume the run is not clobbered; the message says what to pass here
    with pytest.raises(UserError, match=r"train\(resume_from_checkpoint=True\).*overwrite_output_dir=True"):
        other.train()
    # the CLI on that run's config.yaml: the data lives in another process, and the error says what to do
    from oapl.data import memory

    with pytest.raises(UserError, match="passed from Python to another process"):
        memory.lookup_rows("<in-memory:train_dataset:n=2:sha256=0000000000000000>", "task.dataset")


def test_conversational_dataset_reaches_rewards_as_messages(tiny_model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    got = {}

    def reward(prompts, completions, answer, **kw):
        got.update(prompt=prompts[0], completion=completions[0], answer=answer[0], keys=sorted(kw))
        return [0.0] * len(completions)

    system = {"role": "system", "content": "Answer with the number only."}
    ds = datasets.Dataset.from_list(
        [{"prompt": [system, {"role": "user", "content": f"say {i}"}], "answer": str(i)} for i in range(8)]
    )
    trainer = OAPLTrainer(
        tiny_model_dir, reward_funcs=[reward], train_dataset=ds, args=_args(tmp_path / "run", max_steps=1)
    )
    trainer.train()
    assert got["prompt"][0] == system and got["prompt"][1]["role"] == "user"  # TRL: prompts are the messages
    assert isinstance(got["completion"], list) and got["completion"][0]["role"] == "assistant"
    # no `prompt` column as a keyword, as in TRL; TRL's other keywords are there
    assert got["keys"] == ["completion_ids", "log_extra", "log_metric", "trainer_state"]


def test_pretrained_model_object_and_tokenizer_object(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OAPL_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = _args(tmp_path / "run", max_steps=1)
    a = OAPLTrainer(model, reward_funcs="toy_rewards:has_seven", train_dataset=_rows(), args=args, processing_class=tok)
    b = OAPLTrainer(model, reward_funcs="toy_rewards:has_seven", train_dataset=_rows(), args=args, processing_class=tok)
    assert a.config.model.name == b.config.model.name  # content-addressed: saved once
    assert Path(a.config.model.name).parent == tmp_path / "cache" / "in-memory"
    assert a.train().global_step == 1


def test_num_train_epochs_counts_the_training_prompts(tiny_model_dir, tmp_path):
    args = _args(tmp_path / "run", num_train_epochs=2, max_steps=None)
    trainer = OAPLTrainer(tiny_model_dir, reward_funcs="toy_rewards:has_seven", train_dataset=_rows(12), args=args)
    assert trainer.config.steps == 6  # 2 epochs x 12 prompts / 4 prompts per step
    both = OAPLConfig(num_train_epochs=2, max_steps=3)
    assert (
        OAPLTrainer(
            tiny_model_dir, reward_funcs="toy_rewards:has_seven", train_dataset=_rows(12), args=both
        ).config.steps
        == 3
    )  # max_steps wins, as in TRL


def test_trainer_argument_errors_name_the_argument(tiny_model_dir, tmp_path):
    args = _args(tmp_path / "run")
    with pytest.raises(UserError, match="reward_funcs: required with a train_dataset"):
        OAPLTrainer(tiny_model_dir, train_dataset=_rows(), args=args)
    with pytest.raises(UserError, match=r"train_dataset: row 1 is a str"):
        OAPLTrainer(
            tiny_model_dir, reward_funcs="toy_rewards:has_seven", train_dataset=[{"prompt": "a"}, "b"], args=args
        )
    with pytest.raises(UserError, match=r"train_dataset: row 0: missing column 'prompt'"):
        OAPLTrainer(
            tiny_model_dir, reward_funcs="toy_rewards:has_seven", train_dataset=[{"question": "a"}], args=args
        ).train()
    with pytest.raises(UserError, match=r"reward_funcs\[1\]: 'accuracy' is not of the form module:function"):
        OAPLTrainer(
            tiny_model_dir, reward_funcs=["toy_rewards:has_seven", "accuracy"], train_dataset=_rows(), args=args
        )
    with pytest.raises(
        UserError, match=r"callbacks\[0\]: object is neither a transformers TrainerCallback nor a function"
    ):
        OAPLTrainer(
            tiny_model_dir, reward_funcs="toy_rewards:has_seven", train_dataset=_rows(), args=args, callbacks=[object()]
        )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_broken_reward_stops_the_run_with_its_first_error(tiny_model_dir, tmp_path, asynchronous):
    def broken(prompts, completions, **kw):
        return [len(c) / 0 for c in completions]  # a bug: every completion fails

    trainer = OAPLTrainer(
        tiny_model_dir,
        reward_funcs=[broken],
        train_dataset=_rows(),
        args=_args(tmp_path / "run", rollout={"asynchronous": asynchronous, "prompts_per_generate": 4}),
    )
    with pytest.raises(
        RewardErrorRateError,
        match=r"broken failed on 16 of 16 completions.*ZeroDivisionError.*"
        r"test_api.py, line \d+.*max_reward_error_fraction",
    ):
        trainer.train()
    # configurable: 1.0 scores failures 0 and goes on (counted in reward_errors)
    rows = []
    lenient = OAPLTrainer(
        tiny_model_dir,
        reward_funcs=[broken],
        train_dataset=_rows(),
        callbacks=[rows.append],
        args=_args(tmp_path / "run2", task={"max_reward_error_fraction": 1.0, "system_prompt": None}),
    )
    assert lenient.train().global_step == 4
    assert rows[-1]["reward_errors"] > 0


def test_cli_prints_a_wrapped_reward_error_on_one_line():
    from oapl.errors import user_message

    try:
        try:
            raise RewardErrorRateError("task.reward: f failed on 9 of 16 completions")
        except RewardErrorRateError as cause:
            raise RuntimeError("the rollout worker failed") from cause
    except RuntimeError as e:
        assert user_message(e) == "the rollout worker failed: task.reward: f failed on 9 of 16 completions"


def test_oapl_train_runs_a_config_with_callbacks(tiny_model_dir, prompts_file, tmp_path):
    cfg = oapl.load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "steps=2",
            f"model.name={tiny_model_dir}",
            "engine.kind=transformers",
            "task.name=dataset",
            f"task.dataset={prompts_file}",
            "task.columns={prompt: question, prompt_id: id}",
            "task.reward=toy_rewards:digit_fraction",
            "rollout.group_size=4",
            "rollout.prompts_per_step=2",
            "rollout.asynchronous=false",
            "sampling.max_tokens=4",
            "logging.progress=false",
            "threads=2",
        ],
    )
    rows = []
    result = oapl.train(cfg, callbacks=[rows.append])
    assert result.steps == 2 and [r["step"] for r in rows if "loss" in r] == [1, 2]
    with pytest.raises(UserError, match=r"pass resume=True to continue that run, overwrite=True to replace it"):
        oapl.train(cfg)
    assert oapl.train(cfg, overwrite=True).steps == 2


# -- failing loudly ----------------------------------------------------------------------------------
def _script(tmp_path, body: str) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_math_reward_in_a_script_without_main_guard_fails_saying_what_to_do(tmp_path):
    bad = _script(
        tmp_path,
        """
        from oapl.rewards import math_reward
        print("scores", math_reward(["q"], ["so \\\\boxed{2}"], answer=["2"]))
    """,
    )
    assert bad.returncode != 0
    assert "RewardUnavailableError" in bad.stderr and 'if __name__ == "__main__":' in bad.stderr
    assert "scores [0.0]" not in bad.stdout  # not silently zero
    good = _script(
        tmp_path,
        """
        from oapl.rewards import math_reward
        if __name__ == "__main__":
            print("scores", math_reward(["q"], ["so \\\\boxed{2}"], answer=["2"]))
    """,
    )
    assert good.returncode == 0, good.stderr
    assert "scores [1.0]" in good.stdout


def test_trainer_in_an_unguarded_worker_refuses_at_once(monkeypatch):
    import multiprocessing as mp

    monkeypatch.setattr(mp.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError, match=r'if __name__ == \\"__main__\\"|if __name__ == "__main__"'):
        OAPLTrainer("unused")
    with pytest.raises(RuntimeError, match="re-imports the main script"):
        oapl.train(TrainConfig())


def test_math_reward_in_a_thread_with_trl_arguments_and_a_hanging_check():
    import threading
    import time

    from oapl.rewards.math import MathVerifier

    verifier = MathVerifier(timeout_s=1.0)
    out = {}

    def run():
        t0 = time.perf_counter()
        # TRL passes conversational completions and trainer_state / log_extra / log_metric / completion_ids
        conv = [
            [{"role": "assistant", "content": "so \\boxed{\\frac{1}{2}}"}],
            [{"role": "assistant", "content": "so \\boxed{3}"}],
            [{"role": "assistant", "content": "\\boxed{(10^{10^{10}})!}"}],
        ]  # hangs without a timeout
        out["scores"] = verifier(
            [[{"role": "user", "content": "q"}]] * 3,
            conv,
            answer=["0.5", "2", "1"],
            trainer_state=object(),
            log_extra=None,
            log_metric=None,
            completion_ids=[[1]] * 3,
        )
        out["seconds"] = time.perf_counter() - t0
        out["after"] = verifier(["q"], ["\\boxed{2}"], answer=["2"])  # the pool recovers

    try:
        t = threading.Thread(target=run)
        t.start()
        t.join(120)
        assert out["scores"] == [1.0, 0.0, 0.0] and out["after"] == [1.0]
        assert out["seconds"] < 60
    finally:
        verifier.close()


def test_math_reward_survives_its_workers_dying():
    import os
    import signal

    from oapl.rewards.math import MathVerifier

    verifier = MathVerifier(timeout_s=5.0)
    try:
        assert verifier(["q"], ["\\boxed{2}"], answer=["2"]) == [1.0]
        for proc in list(verifier._pool._processes.values()):  # a worker crash (e.g. killed for memory)
            os.kill(proc.pid, signal.SIGKILL)
        assert verifier(["q"] * 3, ["\\boxed{2}", "\\boxed{3}", "\\boxed{4}"], answer=["2", "2", "4"]) == [
            1.0,
            0.0,
            1.0,
        ]
    finally:
        verifier.close()


def test_in_memory_reward_specs():
    from oapl.data import memory
    from oapl.rewards import math_reward
    from toy_rewards import has_seven

    assert memory.reward_spec(math_reward) == "oapl.rewards.math:math_reward"  # importable: loadable anywhere
    assert memory.reward_spec(has_seven) == "toy_rewards:has_seven"
    first, second = (lambda p, c, **k: [0.0] * len(c)), (lambda p, c, **k: [1.0] * len(c))
    a, b = memory.reward_spec(first), memory.reward_spec(second)
    assert a.startswith("<in-memory:reward:") and a != b and memory.reward_spec(first) == a
    assert memory.lookup_reward(b, "task.reward") is second
    with pytest.raises(UserError, match="reward_funcs: .* is a model"):
        from transformers import LlamaConfig, LlamaForSequenceClassification

        memory.reward_spec(
            LlamaForSequenceClassification(
                LlamaConfig(
                    vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
                )
            )
        )
    assert json.dumps(memory.in_memory_fields({"task": {"reward": [a, "x:y"], "dataset": "d.jsonl"}})) == json.dumps(
        {"task.reward[0]": a}
    )


def test_coming_from_trl_ports_a_grpo_script_by_changing_three_lines(tmp_path):
    import difflib
    import re

    docs = (ROOT / "docs" / "coming-from-trl.md").read_text()
    blocks = dict(re.findall(r"```python\n# (TRL|oapl)\n(.*?)```", docs, re.S))
    trl_code, oapl_code = blocks["TRL"], blocks["oapl"]
    changed = [ln for ln in difflib.ndiff(trl_code.splitlines(), oapl_code.splitlines()) if ln.startswith("+ ")]
    assert len(changed) <= 3, changed
    config = re.search(r"args=(OAPLConfig\(.*?\)),\n\s*\)", oapl_code, re.S).group(1)
    cfg = eval(config, {"OAPLConfig": OAPLConfig})  # noqa: S307 - the docs' own code
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.optim.micro_batch_size) == (8, 8, 16)
    assert (cfg.optim.lr, cfg.sampling.max_tokens, cfg.steps) == (1e-6, 1024, 200)
    trl = pytest.importorskip("trl")
    theirs = eval(
        re.search(r"args=(GRPOConfig\(.*?\)),\n\s*\)", trl_code, re.S).group(1),  # noqa: S307
        {"GRPOConfig": lambda **kw: trl.GRPOConfig(**kw, use_cpu=True, bf16=False)},
    )  # no GPU here
    assert theirs.per_device_train_batch_size * theirs.gradient_accumulation_steps == 64


def test_grpo_baseline_through_the_same_trainer(tiny_model_dir, tmp_path):
    rows = []
    trainer = OAPLTrainer(
        tiny_model_dir,
        reward_funcs="toy_rewards:has_seven",
        train_dataset=_rows(),
        args=_args(tmp_path / "run", max_steps=2, algorithm="grpo", epsilon=0.3, vllm_importance_sampling_cap=3.0),
        callbacks=[rows.append],
    )
    assert trainer.train().global_step == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["algorithm"]
    assert (saved["name"], saved["clip_eps"], saved["is_cap"]) == ("grpo", 0.3, 3.0)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
