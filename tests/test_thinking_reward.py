"""Thinking models are scored on the final answer after ``</think>``; truncated thinking scores 0."""

from __future__ import annotations

import json

import pytest

from oapl.config import TaskConfig, TrainConfig
from oapl.data.tasks import build_task
from oapl.rewards.arithmetic import arithmetic_reward
from oapl.rewards.base import SafeReward
from oapl.rewards.thinking import ThinkingAwareReward, final_answer

# what Qwen3-*-Thinking-2507 / DeepSeek-R1 chat templates render: the prompt opens the thinking block
THINKING_PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
PLAIN_PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "prompt, completion, mode, expected",
    [
        # closed thinking: only the text after </think>
        (THINKING_PROMPT, "maybe \\boxed{3}?</think>\n\nSo \\boxed{4}.", "auto", "\n\nSo \\boxed{4}."),
        # truncated inside the thinking the prompt opened: nothing to score
        (THINKING_PROMPT, "maybe \\boxed{4} but let me check", "auto", None),
        # the response opens its own thinking and never closes it
        (PLAIN_PROMPT, "<think>\\boxed{4} hmm", "auto", None),
        # the response opens and closes its own thinking
        (PLAIN_PROMPT, "<think>\\boxed{3}</think>\\boxed{4}", "auto", "\\boxed{4}"),
        # no thinking anywhere: the whole response (non-thinking models are unaffected)
        (PLAIN_PROMPT, "\\boxed{4}", "auto", "\\boxed{4}"),
        # several blocks: the text after the last close tag
        (THINKING_PROMPT, "a</think>b<think>c</think>d", "auto", "d"),
        # required: no close tag means no answer, even when nothing says the model thinks
        (PLAIN_PROMPT, "\\boxed{4}", "required", None),
        (PLAIN_PROMPT, "x</think>\\boxed{4}", "required", "\\boxed{4}"),
        # off: the raw response
        (THINKING_PROMPT, "maybe \\boxed{4} but", "off", "maybe \\boxed{4} but"),
    ],
)
def test_final_answer(prompt, completion, mode, expected):
    assert final_answer(prompt, completion, mode) == expected


def test_final_answer_custom_tags_and_bad_mode():
    tags = ("<reasoning>", "</reasoning>")
    assert final_answer("assistant: <reasoning>", "r</reasoning>42", "auto", tags) == "42"
    assert final_answer("assistant: <reasoning>", "r 42", "auto", tags) is None
    with pytest.raises(ValueError, match="task.thinking"):
        final_answer("", "", "sometimes")
    with pytest.raises(ValueError, match="task.think_tags"):
        ThinkingAwareReward(arithmetic_reward, "auto", ("<think>", ""))


def test_wrapped_reward_scores_only_the_final_answer_and_zero_for_truncated_thinking():
    reward = ThinkingAwareReward(arithmetic_reward, "auto")
    prompts = [THINKING_PROMPT, THINKING_PROMPT, THINKING_PROMPT, PLAIN_PROMPT]
    completions = [
        "2+2 is \\boxed{3}? no.</think>\n\nThe answer is \\boxed{4}.",  # right after thinking -> 1
        "2+2 is \\boxed{4}. Let me double-check: 2+2 =",  # cut off inside thinking -> 0
        "2+2 is \\boxed{4}.</think>\n\nThe answer is \\boxed{5}.",  # right in thinking, wrong answer -> 0
        "The answer is \\boxed{4}.",  # no thinking -> scored whole -> 1
    ]
    assert reward(prompts, completions, answer=[4, 4, 4, 4]) == [1.0, 0.0, 0.0, 1.0]
    # the same responses scored raw: the truncated one and the wrong-final-answer one are judged otherwise
    assert ThinkingAwareReward(arithmetic_reward, "off")(prompts, completions, answer=[4] * 4) == [1.0, 1.0, 0.0, 1.0]


def test_wrapped_reward_passes_aligned_columns_and_skips_unanswered():
    calls = []

    def spy(prompts, completions, answer, tag):
        calls.append((list(completions), list(answer), list(tag)))
        return [float(len(c)) for c in completions]

    reward = ThinkingAwareReward(spy, "auto")
    out = reward([THINKING_PROMPT] * 3, ["a</think>xy", "no end", "b</think>z"], answer=[1, 2, 3], tag=["p", "q", "r"])
    assert out == [2.0, 0.0, 1.0]
    assert calls == [(["xy", "z"], [1, 3], ["p", "r"])]  # the unanswered response never reaches the reward
    calls.clear()
    assert reward([THINKING_PROMPT], ["cut"], answer=[1], tag=["p"]) == [0.0]
    assert calls == []


def test_build_task_wraps_every_reward_unless_off(tmp_path):
    task = build_task(TaskConfig(name="arithmetic", num_train=4, num_eval=2))
    # task.reward_fn is the task's reward (carrying task.max_reward_error_fraction) around the thinking wrapper
    assert isinstance(task.reward_fn.fn, ThinkingAwareReward) and task.reward_fn.fn.mode == "auto"
    off = build_task(TaskConfig(name="arithmetic", num_train=4, num_eval=2, thinking="off"))
    assert off.reward_fn.fn is arithmetic_reward
    safe = SafeReward(task.reward_fn)
    assert safe([THINKING_PROMPT, PLAIN_PROMPT], ["\\boxed{4}", "\\boxed{4}"], answer=[4, 4]) == [0.0, 1.0]


def test_math_task_scores_the_boxed_answer_after_thinking(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "1/2 + 1/4?", "answer": "\\frac{3}{4}"}) + "\n")
    task = build_task(TaskConfig(name="math", dataset=str(path), columns={"prompt": "problem"}))
    try:
        got = task.reward_fn(
            [THINKING_PROMPT] * 3,
            [
                "Is it \\boxed{\\frac{1}{2}}? No.</think>\n\n$\\boxed{\\frac{3}{4}}$",  # final answer right
                "It is \\boxed{\\frac{3}{4}}, let me verify by",  # truncated in thinking
                "It is \\boxed{\\frac{3}{4}}</think>\n\n\\boxed{\\frac{1}{2}}",
            ],  # final answer wrong
            answer=["\\frac{3}{4}"] * 3,
        )
    finally:
        task.reward_fn.close()
    assert got == [1.0, 0.0, 0.0]


def test_thinking_fields_validate():
    cfg = TrainConfig.model_validate({"task": {"thinking": "required", "think_tags": ["<r>", "</r>"]}})
    assert cfg.task.think_tags == ("<r>", "</r>")
    with pytest.raises(ValueError, match="thinking"):
        TrainConfig.model_validate({"task": {"thinking": "maybe"}})
