"""oapl's math and code rewards as ``reward_funcs`` of TRL's GRPOTrainer, trained off the main thread (issue 14).

TRL calls a reward with ``prompts``, ``completions`` (message lists for a conversational dataset),
``completion_ids``, ``trainer_state``, ``log_extra``, ``log_metric`` and the dataset's other
columns. TRL's own math reward turns math-verify's timeouts off outside the main thread (they use
``signal.alarm``); oapl's runs the checks in worker processes, so they keep working there.

A random tiny model writes no correct answer, so each oapl reward is called twice by a wrapper
registered with TRL: once on the model's completions (what TRL would score) and once on the same
TRL arguments with a correct and a wrong answer spliced into the completions, which must score 1 and 0.
"""

from __future__ import annotations

import json
import threading

import pytest

trl = pytest.importorskip("trl")


def _spliced(completions, texts):
    """``completions`` in TRL's shape (strings or [{"role": "assistant", ...}]) with other texts."""
    if completions and isinstance(completions[0], list):
        return [[{"role": "assistant", "content": t}] for t in texts]
    return list(texts)


def test_math_and_code_rewards_in_trls_grpo_trainer_off_the_main_thread(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oapl.rewards import code_reward, math_reward

    checks: list[dict] = []

    def math_check(prompts, completions, **kwargs):
        real = math_reward(prompts, completions, **kwargs)  # exactly what TRL passes
        n = len(completions)
        texts = [f"so \\boxed{{{a}}}" if i % 2 == 0 else "so \\boxed{-1}" for i, a in enumerate(kwargs["answer"])]
        spliced = math_reward(prompts, _spliced(completions, texts), **kwargs)
        checks.append(
            {
                "fn": "math",
                "thread": threading.current_thread().name,
                "kwargs": sorted(kwargs),
                "conversational": isinstance(completions[0], list),
                "real": real,
                "spliced": spliced,
                "want": [1.0 if i % 2 == 0 else 0.0 for i in range(n)],
            }
        )
        return real

    def code_check(prompts, completions, **kwargs):
        real = code_reward(prompts, completions, **kwargs)
        n = len(completions)
        texts = [
            "```python\nprint(int(input()) + 1)\n```" if i % 2 == 0 else "```python\nprint(0)\n```" for i in range(n)
        ]
        spliced = code_reward(prompts, _spliced(completions, texts), **kwargs)
        checks.append(
            {
                "fn": "code",
                "thread": threading.current_thread().name,
                "kwargs": sorted(kwargs),
                "conversational": isinstance(completions[0], list),
                "real": real,
                "spliced": spliced,
                "want": [1.0 if i % 2 == 0 else 0.0 for i in range(n)],
            }
        )
        return real

    rows = [
        {
            "prompt": [{"role": "user", "content": f"add one to {i}"}],
            "answer": str(i + 1),
            "tests": json.dumps([{"input": f"{i}\n", "output": f"{i + 1}\n", "testtype": "stdin"}]),
        }
        for i in range(8)
    ]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        reward_funcs=[math_check, code_check],
        args=args,
        train_dataset=Dataset.from_list(rows),
    )
    errors: list[BaseException] = []

    def run():
        try:
            trainer.train()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    worker = threading.Thread(target=run, name="trl-train")
    worker.start()
    worker.join(600)
    assert not worker.is_alive(), "TRL training did not finish"
    if errors:
        raise errors[0]
    assert {c["fn"] for c in checks} == {"math", "code"}
    for c in checks:
        assert c["thread"] == "trl-train"  # off the main thread
        assert c["conversational"]  # TRL passed message lists
        assert {"answer", "tests", "trainer_state", "completion_ids"} <= set(c["kwargs"])
        assert c["spliced"] == c["want"], c
        assert all(v in (0.0, 1.0) for v in c["real"])
    logged = [r for r in trainer.state.log_history if "rewards/math_check/mean" in r]
    assert logged and "rewards/code_check/mean" in logged[0]
