"""Reward functions in TRL's calling convention (issue 28): keywords as GRPOTrainer passes them, TRL's own
reward functions unchanged, wrong signatures caught before the model loads, reward_weights from the
config, and TRL's per-function metrics ``rewards/<name>/mean`` and ``/std``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from oapl import OAPLConfig, OAPLTrainer
from oapl.rewards.base import CombinedReward, RewardSignatureError, SafeReward
from oapl.rewards.user import UserReward
from oapl.rollout.group import RolloutGroup, reward_metrics

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def _args(out, **over):
    base = dict(
        output_dir=str(out),
        max_steps=2,
        learning_rate=1e-2,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=4,
        weight_sync_steps=2,
        seed=0,
        use_vllm=False,
        disable_tqdm=True,
        threads=2,
        rollout={"asynchronous": False, "prompts_per_generate": 2},
        model={"logprob_chunk_size": 16},
        task={"system_prompt": None},
    )
    base.update(over)
    return OAPLConfig(**base)


def _conversational(n=4):
    return [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "solution": f"${i + 1}$"} for i in range(n)]


# --------------------------------------------------------------------------- the calling convention


def test_keywords_as_trl_passes_them():
    seen = {}

    def trl_style(completions, **kwargs):  # TRL's documented minimal signature
        seen.update(kwargs, completions=completions)
        return [1.0] * len(completions)

    def legacy(p, c, answer, **kw):  # oapl's earlier convention: by position
        seen["legacy"] = (p, c, answer)
        return [0.5] * len(c)

    state = object()
    reward = CombinedReward([trl_style, legacy])
    out = reward(
        ["<rendered 1>", "<rendered 2>"],
        ["c1", "c2"],
        prompt=["q1", "q2"],
        answer=["1", "2"],
        completion_ids=[[5, 6], [7]],
        trainer_state=state,
    )
    assert out == [1.5, 1.5]
    assert seen["prompts"] == ["q1", "q2"]  # the dataset's prompts, as TRL passes them; not the chat-rendered text
    assert seen["completions"] == ["c1", "c2"] and seen["answer"] == ["1", "2"]
    assert seen["completion_ids"] == [[5, 6], [7]] and seen["trainer_state"] is state
    assert callable(seen["log_metric"]) and callable(seen["log_extra"])
    assert "prompt" not in seen  # the prompt column is `prompts`, not a keyword, as in TRL
    assert seen["legacy"] == (["q1", "q2"], ["c1", "c2"], ["1", "2"])


def test_optional_keywords_only_to_a_function_that_takes_them():
    def strict(prompts, completions, answer):  # no **kwargs: gets no completion_ids / trainer_state
        return [float(a) for a in answer]

    assert CombinedReward([strict])(
        ["r"], ["c"], prompt=["q"], answer=["3"], completion_ids=[[1]], trainer_state=None
    ) == [3.0]


def test_conversational_completions_are_message_lists_as_in_trl():
    got = {}

    def conv(prompts, completions, **kw):
        got.update(prompts=prompts, completions=completions)
        return [0.0] * len(completions)

    msgs = [{"role": "user", "content": "hi"}]
    CombinedReward([conv], conversational=True)(["<rendered>"], ["hello"], prompt=[msgs])
    assert got == {"prompts": [msgs], "completions": [[{"role": "assistant", "content": "hello"}]]}


def test_trls_own_reward_functions_run_unchanged_and_agree_with_calling_them_as_trl_does():
    pytest.importorskip("math_verify")
    from trl.rewards import accuracy_reward, think_format_reward

    texts = ["<think>\nsum\n</think>\nThe answer is $\\boxed{2}$", "no think, $\\boxed{3}$", "<think>x</think> 5"]
    solutions = ["$2$", "$2$", "$5$"]
    prompts = [[{"role": "user", "content": "q"}]] * 3
    reward = SafeReward(CombinedReward([think_format_reward, accuracy_reward], conversational=True, timeout_s=60))
    out = reward(["<rendered>"] * 3, texts, prompt=prompts, solution=solutions)
    # TRL's call: by keyword, conversational completions
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    fmt = think_format_reward(prompts=prompts, completions=completions, solution=solutions)
    acc = accuracy_reward(prompts=prompts, completions=completions, solution=solutions)
    assert fmt == [1.0, 0.0, 1.0] and acc[:2] == [1.0, 0.0]
    assert out.parts == {"think_format_reward": fmt, "accuracy_reward": acc}
    assert out == [f + a for f, a in zip(fmt, acc)]


# --------------------------------------------------------------------------- wrong signatures, early


@pytest.mark.parametrize(
    "fn, needles",
    [
        (lambda completions, solution, **kw: [0.0], ["needs the argument 'solution'", "no dataset column", "answer"]),
        (lambda prompts, completions: [0.0], ["does not take the dataset column 'answer'", "**kwargs"]),
        (lambda x: [0.0], ["r(x) has no 'completions' parameter", "fn(prompts, completions, **kwargs)"]),
    ],
)
def test_a_wrong_signature_says_which_argument(fn, needles):
    with pytest.raises(RewardSignatureError) as e:
        UserReward(fn, name="r").check_signature({"answer": ["1"]}, {"completion_ids": [[]], "trainer_state": None})
    for needle in needles:
        assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_a_wrong_signature_fails_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import oapl.trainer.policy
    from trl.rewards import think_format_reward

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the rewards were checked")

    monkeypatch.setattr(oapl.trainer.policy, "load_policy", no_model)

    def wants_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    rows = [{"prompt": f"say {i}", "answer": str(i)} for i in range(4)]
    with pytest.raises(
        RewardSignatureError,
        match=r"wants_solution\(completions, solution, \*\*kwargs\) needs the "
        r"argument 'solution'",
    ):
        OAPLTrainer(
            tiny_model_dir, reward_funcs=[wants_solution], train_dataset=rows, args=_args(tmp_path / "a")
        ).train()
    # TRL's think_format_reward reads completion[0]["content"]: plain-text prompts give string completions
    with pytest.raises(
        RewardSignatureError,
        match=r"think_format_reward fails on the first training row .*TypeError"
        r".*completions are strings",
    ):
        OAPLTrainer(
            tiny_model_dir, reward_funcs=[think_format_reward], train_dataset=rows, args=_args(tmp_path / "b")
        ).train()
    for out in (tmp_path / "a", tmp_path / "b"):  # nothing of a run was written
        assert not (out / "config.yaml").exists() and not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- weights and metrics


def test_reward_weights_from_the_config():
    args = OAPLConfig(reward_weights=[1.0, 0.5])  # as in TRL: the functions come with the trainer
    assert args.task.reward_weights == [1.0, 0.5] and args.task.reward is None


def test_per_function_metrics_are_nanmean_and_sample_nanstd():
    def group(values, pid):
        n = len(values)
        return RolloutGroup(
            prompt_id=pid,
            prompt="p",
            prompt_token_ids=[1],
            responses=["r"] * n,
            response_token_ids=[[1]] * n,
            response_logprobs=[[0.0]] * n,
            rewards=[0.0] * n,
            finish_reasons=["stop"] * n,
            weights_id="w",
            version=0,
            reward_parts={"acc": values, "fmt": [1.0] * n},
            reward_logged={"judge_calls": [3.0]} if pid == "a" else {},
        )

    m = reward_metrics([group([1.0, 0.0], "a"), group([math.nan, 1.0], "b")])
    # acc: values 1, 0, 1 (None -> NaN skipped): mean 2/3; sum of squares 1/9 + 4/9 + 1/9 = 2/3 over n-1 = 2
    assert m["rewards/acc/mean"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["rewards/acc/std"] == pytest.approx(math.sqrt(1 / 3), abs=1e-12)
    assert m["rewards/fmt/mean"] == 1.0 and m["rewards/fmt/std"] == 0.0
    assert m["judge_calls"] == 3.0  # TRL's log_metric(name, value)


def test_a_trl_script_s_rewards_in_a_conversational_run(tiny_model_dir, tmp_path):
    """TRL's own rewards and a ``fn(completions, **kwargs)`` reward with an extra column, weights from the
    config, in a real (tiny) run: every metrics row has TRL's per-function metrics."""
    pytest.importorskip("math_verify")
    datasets = pytest.importorskip("datasets")
    from trl.rewards import accuracy_reward, think_format_reward

    steps_seen = []

    def length_penalty(completions, trainer_state, completion_ids, **kwargs):
        steps_seen.append((trainer_state.global_step, trainer_state.max_steps))
        kwargs["log_metric"]("length_penalty/calls", 1.0)
        return [-len(ids) / 100 for ids in completion_ids]

    ds = datasets.Dataset.from_list(_conversational())
    trainer = OAPLTrainer(
        tiny_model_dir,
        reward_funcs=[think_format_reward, accuracy_reward, length_penalty],
        train_dataset=ds,
        args=_args(tmp_path / "run", reward_weights=[0.5, 1.0, 1.0]),
    )
    assert trainer.config.task.reward_weights == [0.5, 1.0, 1.0]
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        for name in ("think_format_reward", "accuracy_reward", "length_penalty"):
            assert f"rewards/{name}/mean" in r and f"rewards/{name}/std" in r
        assert r["reward_mean"] == pytest.approx(
            0.5 * r["rewards/think_format_reward/mean"]
            + r["rewards/accuracy_reward/mean"]
            + r["rewards/length_penalty/mean"],
            abs=1e-9,
        )
        assert r["length_penalty/calls"] == 1.0
    # the test call before training (a stand-in state at step 0), then the steps 0 and 1 of a 2-step run
    assert steps_seen[0] == (0, 0) and steps_seen[1:] == [(0, 2), (1, 2)]
