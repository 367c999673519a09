"""Refuse what the engine would silently change: prompt + max_tokens beyond max_model_len, top-p < 1
where the loss needs the full distribution; named held-out benchmarks; per-benchmark Pass@k."""

from __future__ import annotations

import json

import pytest

from oapl.config import ConfigError, TaskConfig, load_config
from oapl.data.budget import TokenBudgetError, check_prompt_budget
from oapl.data.tasks import Task, build_task
from oapl.engines.base import Completion, GenerationOutput, SamplingParams
from oapl.evaluation.heldout import generate_groups, passk_summary
from oapl.rewards.arithmetic import arithmetic_reward
from oapl.rollout.buffer import RolloutBuffer, RolloutGroup
from oapl.rollout.worker import RolloutWorker


class LimitedEngine:
    """Answers "4" to everything; enforces ``max_model_len`` like vLLM would (when it is set)."""

    version = 0

    def __init__(self, max_model_len: int | None) -> None:
        if max_model_len is not None:
            self.max_model_len = max_model_len
        self.calls = 0

    def generate(self, prompt_token_ids, params):
        self.calls += 1
        return [
            GenerationOutput(list(p), [Completion("4", [7], [-0.5]) for _ in range(params.n)], 0)
            for p in prompt_token_ids
        ]

    def load_weights(self, weights, version):
        return 0.0

    def close(self):
        pass


def _task(train, held):
    return Task("arithmetic", train, held, arithmetic_reward, ["answer"], None, "{prompt}", True)


def _ntok(task, tok, ex):
    return len(tok(task.render(ex, tok), add_special_tokens=False).input_ids)


def test_check_prompt_budget_hand_values():
    check_prompt_budget(10, 20, 30, split="train", row=0, prompt_id="a", max_tokens_field="sampling.max_tokens")
    check_prompt_budget(10**6, 20, None, split="train", row=0, prompt_id="a", max_tokens_field="x")  # no limit
    with pytest.raises(TokenBudgetError) as e:
        check_prompt_budget(11, 20, 30, split="train", row=3, prompt_id="p3", max_tokens_field="sampling.max_tokens")
    msg = str(e.value)
    assert "train row 3 (prompt_id 'p3')" in msg
    assert "prompt of 11 tokens + sampling.max_tokens=20 = 31 tokens > engine.max_model_len=30" in msg
    assert "after 19 tokens" in msg and "at least 31" in msg
    with pytest.raises(TokenBudgetError, match="refuse the prompt"):
        check_prompt_budget(40, 20, 30, split="eval", row=0, prompt_id="q", max_tokens_field="eval.max_tokens")


def test_generate_groups_refuses_the_row_that_does_not_fit_before_generating(char_tokenizer):
    held = [
        {"prompt_id": "e0", "prompt": "What is 2 + 2?", "answer": 4},
        {"prompt_id": "e1", "prompt": "What is 2 + 2? Think about it for a long, long while.", "answer": 4},
    ]
    task = _task(held, held)
    n0, n1 = _ntok(task, char_tokenizer, held[0]), _ntok(task, char_tokenizer, held[1])
    assert n1 > n0
    params = SamplingParams(temperature=1.0, max_tokens=8, n=2)
    engine = LimitedEngine(max_model_len=n0 + 8)  # row 0 fits exactly, row 1 does not
    with pytest.raises(TokenBudgetError) as e:
        generate_groups(engine, task, char_tokenizer, held, params)
    msg = str(e.value)
    assert f"eval row 1 (prompt_id 'e1'): prompt of {n1} tokens + eval.max_tokens=8 = {n1 + 8} tokens" in msg
    assert f"engine.max_model_len={n0 + 8}" in msg
    assert engine.calls == 0  # refused before anything was generated
    # the first row alone fits; an explicit limit overrides the engine's; no limit -> no check
    assert len(generate_groups(engine, task, char_tokenizer, held[:1], params)) == 1
    with pytest.raises(TokenBudgetError, match="sampling.max_tokens"):
        generate_groups(
            engine,
            task,
            char_tokenizer,
            held[:1],
            params,
            max_model_len=n0 + 7,
            split="train",
            max_tokens_field="sampling.max_tokens",
        )
    groups = generate_groups(LimitedEngine(None), task, char_tokenizer, held, params)
    assert [g.rewards for g in groups] == [[1.0, 1.0], [1.0, 1.0]]


def test_rollout_worker_refuses_a_training_prompt_that_does_not_fit(char_tokenizer):
    train = [{"prompt_id": "t0", "prompt": "What is 1 + 3? " * 4, "answer": 4}]
    task = _task(train, [])
    n = _ntok(task, char_tokenizer, train[0])
    worker = RolloutWorker(
        LimitedEngine(max_model_len=n + 15),
        task,
        char_tokenizer,
        RolloutBuffer(8),
        SamplingParams(max_tokens=16),
        group_size=2,
        prompts_per_call=1,
        seed=0,
    )
    with pytest.raises(TokenBudgetError) as e:
        worker.produce()
    assert f"train row 0 (prompt_id 't0'): prompt of {n} tokens + sampling.max_tokens=16" in str(e.value)
    ok = RolloutWorker(
        LimitedEngine(max_model_len=n + 16),
        task,
        char_tokenizer,
        RolloutBuffer(8),
        SamplingParams(max_tokens=16),
        group_size=2,
        prompts_per_call=1,
        seed=0,
    )
    assert ok.produce()[0].rewards == [1.0, 1.0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["sampling.max_tokens=512", "engine.max_model_len=512"],
            "sampling.max_tokens=512 does not fit engine.max_model_len=512",
        ),
        (
            ["eval.max_tokens=65536", "engine.max_model_len=34000"],
            "eval.max_tokens=65536 does not fit engine.max_model_len=34000",
        ),
        (["sampling.max_tokens=600", "engine.max_model_len=512", "eval.max_tokens=100"], "sampling.max_tokens=600"),
        # an unset eval.max_tokens is sampling.max_tokens, which is checked
        (["sampling.max_tokens=100", "engine.max_model_len=100"], "sampling.max_tokens=100 does not fit"),
        (
            ["algorithm.name=grpo", "sampling.top_p=0.9"],
            "sampling.top_p=0.9 with GRPO's importance-sampling correction",
        ),
        (["algorithm.name=oapl", "sampling.top_p=0.95"], "sampling.top_p must be 1.0 for OAPL"),
        (["task.name=math", "task.eval_benchmarks=[aime25, aime26]"], "unknown benchmark(s) ['aime26']"),
        (["task.name=math", "task.eval_benchmarks=[aime25]", "task.eval_dataset=x.jsonl"], "set only one"),
        (["task.eval_benchmarks=[aime25]"], "needs task.name=math or dataset"),
    ],
)
def test_config_refuses(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_config_accepts_what_fits():
    cfg = load_config(None, ["sampling.max_tokens=16384", "engine.max_model_len=18432", "eval.max_tokens=16384"])
    assert cfg.engine.max_model_len == 18432
    # GRPO without the correction may sample with top-p < 1 (its ratio uses the trainer's own pi_old)
    assert (
        load_config(None, ["algorithm.name=grpo", "sampling.top_p=0.9", "algorithm.is_cap=null"]).sampling.top_p == 0.9
    )
    # no limit configured: vLLM uses the model's own, checked per prompt at run time
    assert load_config(None, ["sampling.max_tokens=100000"]).engine.max_model_len is None


def _bench_file(path, n, prefix):
    path.write_text("".join(json.dumps({"problem": f"{prefix} {i}?", "answer": str(i)}) + "\n" for i in range(n)))
    return str(path)


def test_eval_benchmarks_form_one_labelled_held_out_set(tmp_path, monkeypatch):
    from oapl.data import benchmarks

    monkeypatch.setitem(
        benchmarks.BENCHMARKS,
        "aime25",
        benchmarks.Benchmark("aime25", _bench_file(tmp_path / "a.jsonl", 3, "A"), "train", "problem", "answer"),
    )
    monkeypatch.setitem(
        benchmarks.BENCHMARKS,
        "brumo25",
        benchmarks.Benchmark("brumo25", _bench_file(tmp_path / "b.jsonl", 2, "B"), "train", "problem", "answer"),
    )
    train = _bench_file(tmp_path / "train.jsonl", 4, "T")
    cfg = TaskConfig(name="math", dataset=train, columns={"prompt": "problem"}, eval_benchmarks=["aime25", "brumo25"])
    task = build_task(cfg)
    assert [(r["benchmark"], r["prompt_id"], r["prompt"]) for r in task.eval] == [
        ("aime25", "aime25/a-0", "A 0?"),
        ("aime25", "aime25/a-1", "A 1?"),
        ("aime25", "aime25/a-2", "A 2?"),
        ("brumo25", "brumo25/b-0", "B 0?"),
        ("brumo25", "brumo25/b-1", "B 1?"),
    ]
    # max_eval_prompts applies per benchmark, so every benchmark stays represented
    small = build_task(cfg.model_copy(update={"max_eval_prompts": 1}))
    assert [r["prompt_id"] for r in small.eval] == ["aime25/a-0", "brumo25/b-0"]


def _group(pid, bench, rewards):
    n = len(rewards)
    return RolloutGroup(
        prompt_id=pid,
        prompt="p",
        prompt_token_ids=[1],
        responses=["r"] * n,
        response_token_ids=[[1]] * n,
        response_logprobs=[[0.0]] * n,
        rewards=rewards,
        finish_reasons=["stop"] * n,
        weights_id="w",
        version=0,
        benchmark=bench,
    )


def test_passk_summary_per_benchmark_and_their_mean():
    groups = [_group("a1", "aime25", [1, 0]), _group("b1", "brumo25", [0, 0]), _group("b2", "brumo25", [0, 0])]
    s = passk_summary(groups)
    # pooled over prompts: pass@1 = (1/2 + 0 + 0) / 3; pass@2 = (1 + 0 + 0) / 3
    assert s["pass@1"] == pytest.approx(1 / 6) and s["pass@2"] == pytest.approx(1 / 3)
    assert s["aime25/pass@1"] == 0.5 and s["aime25/pass@2"] == 1.0
    assert s["brumo25/pass@1"] == 0.0 and s["brumo25/pass@2"] == 0.0
    # the unweighted mean over benchmarks (the paper's selection metric for math)
    assert s["benchmark_mean/pass@1"] == 0.25 and s["benchmark_mean/pass@2"] == 0.5
    assert s["reward_mean"] == pytest.approx(1 / 6)
    # one benchmark: no per-benchmark keys
    assert set(passk_summary(groups[:1])) == {"pass@1", "pass@2", "reward_mean"}


def test_eval_dataset_config_selects_the_held_out_subset(monkeypatch):
    import oapl.data.code as code

    seen = []

    def fake_load_deepcoder(source, split, subsets=None, limit=None):
        seen.append((split, subsets))
        return [{"prompt_id": f"{split}-0", "problem": "p", "tests": [], "metadata": {}}]

    monkeypatch.setattr(code, "load_deepcoder", fake_load_deepcoder)
    build_task(
        TaskConfig(
            name="code",
            dataset="hub/deepcoder",
            eval_dataset="hub/deepcoder",
            eval_split="test",
            eval_dataset_config="lcbv5",
        )
    )
    # training: every default subset (None); held-out: only DeepCoder's LiveCodeBench subset
    assert seen == [("train", None), ("test", ["lcbv5"])]
