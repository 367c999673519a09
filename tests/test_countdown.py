"""The built-in countdown task: its verifier (hand-computed cases) and its problem generator."""

from __future__ import annotations

import itertools

import pytest

from oapl.api import load_config
from oapl.config import ConfigError, TaskConfig
from oapl.data.tasks import COUNTDOWN_SYSTEM_PROMPT, _countdown_problem, build_task, countdown_examples
from oapl.rewards.countdown import check_expression, countdown_reward, evaluate, extract_expression

# -- verifier ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expr",
    [
        (" 3 * 5 + 4 = 19", "3 * 5 + 4"),  # the few-shot format
        ("To make 18: 6 * 4 - 6 = 17", "6 * 4 - 6"),  # the claim after "=" is not read
        (" 6 * 4 - 6 = 18\nUse 1, 2 to make 3: 1 + 2 = 3", "6 * 4 - 6"),  # only the first equation
        ("(6 + 6) + 4\n2 + 2", "(6 + 6) + 4"),  # no "=": the end of the first line
        (" 6 \u00d7 4 \u2212 6", "6 * 4 - 6"),  # x-sign and minus sign
        (" 18 - 6 - 4 = 18", "18 - 6 - 4"),
        ("I cannot do that.", None),
        ("", None),
    ],
)
def test_extract_expression(text, expr):
    assert extract_expression(text) == expr


@pytest.mark.parametrize(
    "expr, value",
    [
        ("2 + 3 * 4", 14),  # * before +
        ("(2 + 3) * 4", 20),
        ("9 - 2 - 1", 6),  # left to right
        ("9 - (2 - 1)", 8),
        ("4 * 8 - 3", 29),
        ("7", 7),
    ],
)
def test_evaluate_hand_computed(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize(
    "expr, numbers, target, ok",
    [
        ("3 * 5 + 4", [3, 5, 4], 19, True),
        ("4 + 5 * 3", [3, 5, 4], 19, True),  # any order of the numbers
        ("(4 + 5) * 3", [3, 5, 4], 27, True),  # parentheses
        ("4 + 5 * 3", [3, 5, 4], 27, False),  # precedence: 4 + 15 = 19, not 27
        ("6 * 4 - 6", [6, 6, 4], 18, True),  # a repeated number used as often as given
        ("6 * 3", [6, 6, 4], 18, False),  # 3 is not given; 6 and 4 unused
        ("6 + 6 + 6", [6, 6, 4], 18, False),  # 6 used three times
        ("6 * 4 - 6 + 0", [6, 6, 4], 18, False),  # an extra number
        ("3 * 5", [3, 5, 4], 15, False),  # 4 unused
        ("35 - 4", [3, 5, 4], 31, False),  # no digit concatenation
        ("-3 + 5 * 4", [3, 5, 4], 17, False),  # no unary minus
        ("8 / 2 + 3", [8, 2, 3], 7, False),  # no division
        ("(3 + 5 * 4", [3, 5, 4], 23, False),  # unbalanced
        ("3 + 5 * 4)", [3, 5, 4], 23, False),
        ("3 + + 5 * 4", [3, 5, 4], 23, False),
        ("03 + 5 * 4", [3, 5, 4], 23, False),  # leading zero
        ("3 * 5 + 4", [3, 5, 4], 20, False),  # wrong value
    ],
)
def test_check_expression_hand_computed(expr, numbers, target, ok):
    assert check_expression(expr, numbers, target) is ok


def test_check_expression_rejects_oversized_input_cheaply():
    assert not check_expression("1 + " * 1000 + "1", [1, 1], 2)
    assert not check_expression("(" * 30 + "1 + 1" + ")" * 30, [1, 1], 2)  # nested too deeply


def test_countdown_reward_batch_and_gaming():
    completions = [" 3 * 5 + 4 = 19", " 3 + 5 + 4 = 19", " 3 + 5 + 4 = 12\n 3 * 5 + 4 = 19", " 19", "3 * 5 + 4 is 19"]
    n = len(completions)
    rewards = countdown_reward(["p"] * n, completions, numbers=[[3, 5, 4]] * n, target=[19] * n)
    # only the first equation counts (a second attempt earns nothing); a bare target is not an expression;
    # without "=" the end of the first line ("19") is the expression
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert countdown_reward(["p"], [" 9 - 2 - 1 = 6"], numbers=[[1, 9, 2]], target=[6], answer=[0]) == [1.0]


# -- generator ---------------------------------------------------------------------------------------


class _FixedRng:
    """Stands in for random.Random: fixed draws, shuffle reverses."""

    def __init__(self, ints, choices):
        self.ints, self.choices = iter(ints), iter(choices)

    def randint(self, low, high):
        value = next(self.ints)
        assert low <= value <= high
        return value

    def choice(self, seq):
        value = next(self.choices)
        assert value in seq
        return value

    def shuffle(self, seq):
        seq.reverse()


@pytest.mark.parametrize(
    "ints, ops, shown, target",
    [
        ([3, 5, 4], ["*", "+"], (4, 5, 3), 19),  # 3 * 5 + 4
        ([3, 5, 4], ["+", "*"], (4, 5, 3), 23),  # 3 + 5 * 4: precedence
        ([9, 2, 1], ["-", "-"], (1, 2, 9), 6),  # 9 - 2 - 1
        ([2, 9], ["-"], None, None),  # 2 - 9 < 1: rejected
        ([4, 4], ["-"], None, None),  # 0 < 1: rejected
    ],
)
def test_countdown_problem_hand_computed(ints, ops, shown, target):
    got = _countdown_problem(_FixedRng(ints, ops), len(ints), 1, 9, ["+", "-", "*"])
    assert got == (None if shown is None else (shown, target))


def _solvable(numbers, target) -> bool:
    """Brute force: some order of the numbers joined by some operations (no parentheses) makes target."""
    for perm in itertools.permutations(numbers):
        for ops in itertools.product("+-*", repeat=len(numbers) - 1):
            expr = str(perm[0]) + "".join(f" {o} {n}" for o, n in zip(ops, perm[1:]))
            if check_expression(expr, list(numbers), target):
                return True
    return False


def test_countdown_split_is_fixed_disjoint_distinct_and_solvable():
    cfg = TaskConfig(name="countdown", num_train=400, num_eval=128)
    assert cfg.countdown_operations == ["+", "*"] and cfg.countdown_range == (1, 9) and cfg.countdown_numbers == 3
    train_a, held_a = countdown_examples(cfg, seed=0)
    train_b, held_b = countdown_examples(cfg, seed=1)
    assert held_a == held_b  # the held-out split does not depend on the run seed
    assert train_a != train_b and len(train_a) == 400 and len(held_a) == 128
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert len({key(r) for r in held_a}) == 128  # distinct problems
    assert len({r["prompt"] for r in held_a}) == 128 and len({r["prompt_id"] for r in held_a}) == 128
    assert not {key(r) for r in held_a} & {key(r) for r in train_a}  # disjoint, whatever the order shown
    for r in held_a + train_a:
        assert len(r["numbers"]) == 3 and all(1 <= n <= 9 for n in r["numbers"]) and r["target"] >= 1
        assert r["prompt"] == f"Use {', '.join(map(str, r['numbers']))} to make {r['target']}:"
        assert _solvable(r["numbers"], r["target"])
    # pinned: the split every study compares on (changing the generator changes it)
    assert [r["prompt"] for r in held_a[:3]] == [
        "Use 1, 3, 1 to make 5:",
        "Use 4, 2, 6 to make 48:",
        "Use 8, 8, 5 to make 21:",
    ]


def test_countdown_options_shape_the_problems():
    cfg = TaskConfig(
        name="countdown",
        num_train=50,
        num_eval=20,
        countdown_numbers=2,
        countdown_range=(10, 20),
        countdown_operations=["+"],
    )
    train, held = countdown_examples(cfg, seed=0)
    for r in train + held:
        assert len(r["numbers"]) == 2 and all(10 <= n <= 20 for n in r["numbers"])
        assert r["target"] == sum(r["numbers"])


def test_countdown_too_many_eval_problems_is_a_clear_error():
    # 2 numbers from [1, 2] with "+": only 3 distinct problems (1+1, 1+2, 2+2)
    cfg = TaskConfig(
        name="countdown", num_eval=4, countdown_numbers=2, countdown_range=(1, 2), countdown_operations=["+"]
    )
    with pytest.raises(ValueError, match=r"task.num_eval=4: only 3 distinct countdown problems.*countdown_range"):
        countdown_examples(cfg, seed=0)
    cfg = TaskConfig(
        name="countdown", num_eval=3, countdown_numbers=2, countdown_range=(1, 2), countdown_operations=["+"]
    )
    with pytest.raises(ValueError, match=r"task.num_eval=3 leaves \(almost\) no training problems"):
        countdown_examples(cfg, seed=0)


def test_countdown_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"task.countdown_range: \[5, 2\] is not a range"):
        load_config(None, ["task.name=countdown", "task.countdown_range=[5, 2]"])
    with pytest.raises(ConfigError, match=r"task.countdown_range: \[0, 9\] is not a range"):
        load_config(None, ["task.countdown_range=[0, 9]"])
    with pytest.raises(ConfigError, match="task.countdown_operations"):
        load_config(None, ["task.countdown_operations=[]"])
    with pytest.raises(ConfigError, match="task.countdown_numbers"):
        load_config(None, ["task.countdown_numbers=1"])
    with pytest.raises(ConfigError, match="did you mean 'countdown'"):
        load_config(None, ["task.name=countdwn"])


def test_countdown_task_prompt_and_reward(char_tokenizer):
    task = build_task(TaskConfig(name="countdown", num_train=8, num_eval=4))
    ex = task.eval[0]
    # plain text by default: the three worked examples, then the problem to continue
    assert task.chat_template is False and task.system_prompt == COUNTDOWN_SYSTEM_PROMPT
    assert task.render(ex, char_tokenizer) == (
        "Use 3, 5, 4 to make 19: 3 * 5 + 4 = 19\nUse 2, 7, 6 to make 15: 2 + 7 + 6 = 15\n"
        "Use 4, 2, 8 to make 20: 4 + 2 * 8 = 20\nUse 1, 3, 1 to make 5:"
    )
    assert task.reward_kwargs([ex]) == {"numbers": [[1, 3, 1]], "target": [5]}
    assert task.reward_fn(["p", "p"], [" 1 + 3 + 1 = 5", " 1 * 3 + 1 = 5"], **task.reward_kwargs([ex, ex])) == [
        1.0,
        0.0,
    ]
    chat = build_task(TaskConfig(name="countdown", num_train=8, num_eval=4, chat_template=True, system_prompt=""))
    assert chat.system_prompt is None and chat.render(ex, char_tokenizer).startswith("<|im_start|>user\nUse 1, 3, 1")
    # the other tasks keep the chat template by default
    assert build_task(TaskConfig(name="arithmetic", num_train=8, num_eval=4)).chat_template is True
