"""Tasks: training prompts, a held-out split, and the reward that scores them.

A task is data plus a verifier. Built in: ``arithmetic`` and ``countdown`` (generated problems, run
anywhere), ``math`` (boxed answers checked by math-verify; DeepScaleR-style data), ``code`` (programs run on
test cases in a sandbox), and ``dataset`` (any prompts with a user reward ``module:function``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

from oapl.config import TaskConfig
from oapl.data.datasets import DatasetError, load_rows, map_columns
from oapl.rewards.base import CombinedReward, RewardFn, load_reward
from oapl.rewards.user import reward_name

ARITHMETIC_EVAL_SEED = 1_234_567  # fixed: the held-out split is the same for every run seed
COUNTDOWN_EVAL_SEED = 7_654_321  # likewise for countdown


@dataclass
class Task:
    name: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    reward_fn: RewardFn
    reward_columns: list[str] = field(default_factory=list)
    system_prompt: str | None = None
    prompt_template: str = "{prompt}"
    chat_template: bool = True
    #: passed to TRL-style rewards as ``trainer_state`` (``global_step`` kept current by the loop)
    trainer_state: Any = None

    def messages(self, example: dict[str, Any]) -> list[dict[str, str]]:
        prompt = example.get("prompt")
        if prompt is not None and is_conversational(prompt):  # TRL's conversational format: the row's own messages
            msgs = [{"role": str(m["role"]), "content": m.get("content", "")} for m in prompt]
            if self.system_prompt is not None and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": self.system_prompt})
            return msgs
        try:
            user = self.prompt_template.format(**example)
        except KeyError as e:
            raise DatasetError(
                f"task.prompt_template uses column {e} that example {example.get('prompt_id')!r} lacks"
            ) from None
        msgs = [{"role": "user", "content": user}]
        if self.system_prompt is not None:
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def render(self, example: dict[str, Any], tokenizer) -> str:
        """The prompt text given to the model (chat template applied when enabled)."""
        msgs = self.messages(example)
        if self.chat_template and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in msgs)

    def reward_kwargs(self, examples: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {col: [ex.get(col) for ex in examples] for col in self.reward_columns}


def is_conversational(prompt: Any) -> bool:
    """Whether a ``prompt`` value is TRL's conversational format: a list of ``{"role", "content"}`` messages."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )


class TaskReward:
    """The reward of a task, as :class:`~oapl.rewards.base.SafeReward` calls it.

    Carries ``max_error_fraction`` (``task.max_reward_error_fraction``), which ``SafeReward`` reads
    to decide when failures stop the run.
    """

    def __init__(self, fn: RewardFn, max_error_fraction: float) -> None:
        self.fn = fn
        self.max_error_fraction = max_error_fraction
        self.__name__ = reward_name(fn)  # TRL's name: a function's __name__, else the class name

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return self.fn(prompts, completions, **columns)

    def close(self) -> None:
        close = getattr(self.fn, "close", None)
        if callable(close):
            close()


def user_reward(cfg: TaskConfig, conversational: bool = False) -> RewardFn | None:
    """``task.reward`` loaded: a :class:`~oapl.rewards.base.CombinedReward` of its functions, summed with
    ``task.reward_weights``, each called as TRL calls it under ``task.reward_timeout_s``; ``None`` if unset.

    (TRL's semantics: ``None`` adds nothing; ``prompts`` are the rows' prompts; conversational
    completions as messages.)
    """
    if cfg.reward is None:
        if cfg.reward_weights is not None:
            raise ValueError(
                "task.reward_weights needs task.reward (the functions they weigh): pass reward_funcs or set task.reward"
            )
        return None
    if isinstance(cfg.reward, list):
        fns = [load_reward(spec, f"task.reward[{i}]") for i, spec in enumerate(cfg.reward)]
    else:
        fns = [load_reward(cfg.reward)]
    return CombinedReward(fns, cfg.reward_weights, conversational=conversational, timeout_s=cfg.reward_timeout_s)


def check_user_reward(task: Task) -> None:
    """Call the task's user rewards once on its first training row, before anything heavy loads
    (:meth:`~oapl.rewards.base.CombinedReward.check`): a wrong signature fails in seconds."""
    fn = task.reward_fn
    if not isinstance(fn, CombinedReward) or not task.train:
        return
    row = task.train[0]
    fn.check(
        [str(row.get("prompt", ""))],
        [PROBE_COMPLETION],
        **task.reward_kwargs([row]),
        completion_ids=[[]],
        trainer_state=task.trainer_state,
    )


#: The completion of that test call: short, plain, like a real one.
PROBE_COMPLETION = "The answer is 0."


def _arithmetic_problem(rng: random.Random, max_operand: int, ops: Sequence[str]) -> tuple[int, str, int]:
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    op = rng.choice(ops)
    return a, op, b


def _arithmetic_answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_examples(cfg: TaskConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """A fixed held-out split (seeded independently of the run) and training problems disjoint from it."""
    ops = list(cfg.operations)
    space = cfg.max_operand * cfg.max_operand * len(ops)
    if cfg.num_eval >= space:
        raise ValueError(
            f"task.num_eval={cfg.num_eval} leaves no training problems: only {space} distinct "
            f"problems with max_operand={cfg.max_operand} and operations={ops}"
        )
    rng = random.Random(ARITHMETIC_EVAL_SEED)
    held: dict[tuple, dict] = {}
    while len(held) < cfg.num_eval:
        a, op, b = _arithmetic_problem(rng, cfg.max_operand, ops)
        held.setdefault(
            (a, op, b),
            {
                "prompt_id": f"eval-{a}{op}{b}",
                "prompt": f"What is {a} {op} {b}?",
                "answer": _arithmetic_answer(a, op, b),
            },
        )
    rng = random.Random(seed)
    train = []
    for i in range(cfg.num_train):
        while True:
            a, op, b = _arithmetic_problem(rng, cfg.max_operand, ops)
            if (a, op, b) not in held:
                break
        train.append(
            {"prompt_id": f"train-{i}", "prompt": f"What is {a} {op} {b}?", "answer": _arithmetic_answer(a, op, b)}
        )
    return train, list(held.values())


ARITHMETIC_SYSTEM_PROMPT = "Answer with the number only."


def _countdown_problem(
    rng: random.Random, count: int, low: int, high: int, ops: Sequence[str]
) -> tuple[tuple[int, ...], int] | None:
    """Numbers (in the order shown) and a target made from all of them, or ``None`` if the target is < 1."""
    from oapl.rewards.countdown import evaluate

    nums = [rng.randint(low, high) for _ in range(count)]
    expr = " ".join(f"{rng.choice(ops)} {n}" for n in nums[1:])
    target = evaluate(f"{nums[0]} {expr}")  # the usual precedence: * before + and -
    if target < 1:
        return None
    rng.shuffle(nums)
    return tuple(nums), target


def _countdown_row(prompt_id: str, nums: tuple[int, ...], target: int) -> dict[str, Any]:
    return {
        "prompt_id": prompt_id,
        "prompt": f"Use {', '.join(map(str, nums))} to make {target}:",
        "numbers": list(nums),
        "target": target,
    }


def countdown_examples(cfg: TaskConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Countdown problems: a fixed held-out split of ``task.num_eval`` distinct problems (seeded
    independently of the run) and ``task.num_train`` training problems, none of them a held-out one.

    A problem is ``task.countdown_numbers`` numbers drawn from ``task.countdown_range`` and a target
    made by joining them with random ``task.countdown_operations`` (kept if it is at least 1), so every
    problem has a solution. Two problems are the same when they have the same numbers (in any order)
    and target.
    """
    count, (low, high), ops = cfg.countdown_numbers, cfg.countdown_range, list(cfg.countdown_operations)
    where = f"countdown_numbers={count}, countdown_range=[{low}, {high}] and countdown_operations={ops}"
    rng = random.Random(COUNTDOWN_EVAL_SEED)
    held: dict[tuple, dict] = {}
    draws = 0
    while len(held) < cfg.num_eval:
        draws += 1
        if draws > 10_000 + 200 * cfg.num_eval:
            raise ValueError(
                f"task.num_eval={cfg.num_eval}: only {len(held)} distinct countdown problems found with "
                f"{where}; lower task.num_eval or widen task.countdown_range"
            )
        problem = _countdown_problem(rng, count, low, high, ops)
        if problem is None:
            continue
        nums, target = problem
        key = (tuple(sorted(nums)), target)
        if key not in held:
            held[key] = _countdown_row(f"eval-{','.join(map(str, nums))}={target}", nums, target)
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    misses = 0
    while len(train) < cfg.num_train:
        problem = _countdown_problem(rng, count, low, high, ops)
        if problem is None or (tuple(sorted(problem[0])), problem[1]) in held:
            misses += 1
            if misses > 10_000:
                raise ValueError(
                    f"task.num_eval={cfg.num_eval} leaves (almost) no training problems: the held-out "
                    f"split takes nearly every countdown problem with {where}"
                )
            continue
        misses = 0
        train.append(_countdown_row(f"train-{len(train)}", *problem))
    return train, list(held.values())


#: Three worked examples (a * b + c, a + b + c, a + b * c): the default ``task.system_prompt`` of
#: countdown, the text each problem continues.
COUNTDOWN_SYSTEM_PROMPT = (
    "Use 3, 5, 4 to make 19: 3 * 5 + 4 = 19\nUse 2, 7, 6 to make 15: 2 + 7 + 6 = 15\n"
    "Use 4, 2, 8 to make 20: 4 + 2 * 8 = 20"
)
MATH_PROMPT_TEMPLATE = "{prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def _load_split(
    cfg: TaskConfig, source: str, split: str, required: list[str], limit: int | None, config: str | None = None
):
    rows, label = load_rows(source, split, config if config is not None else cfg.dataset_config)
    if not rows:
        raise DatasetError(f"{label}: no rows")
    rows = map_columns(rows, cfg.columns, required, label)
    return rows[:limit] if limit else rows


def build_task(cfg: TaskConfig, seed: int = 0) -> Task:
    """Assemble the task named by ``task.name`` from the config.

    The reward is wrapped by :class:`oapl.rewards.thinking.ThinkingAwareReward` unless
    ``task.thinking`` is ``off``: a thinking model is scored on its final answer only.
    """
    task = _build_task(cfg, seed)
    task.trainer_state = _trainer_state()
    if isinstance(task.reward_fn, CombinedReward) and "prompt" not in task.reward_columns:
        task.reward_columns.append("prompt")  # TRL passes the rows' prompts (not the rendered text) as `prompts`
    check_user_reward(task)
    if cfg.thinking != "off":
        from oapl.rewards.thinking import ThinkingAwareReward

        task.reward_fn = ThinkingAwareReward(task.reward_fn, cfg.thinking, cfg.think_tags)
    task.reward_fn = TaskReward(task.reward_fn, cfg.max_reward_error_fraction)
    return task


def _trainer_state() -> Any:
    """What rewards get as ``trainer_state`` outside a training run (and in the check before it): the
    fields of ``transformers.TrainerState`` they read, at step 0. The training loop puts a real one."""
    import types

    return types.SimpleNamespace(global_step=0, max_steps=0, epoch=0.0, log_history=[])


def _benchmark_rows(cfg: TaskConfig, task_name: str) -> list[dict[str, Any]]:
    """The held-out rows of ``task.eval_benchmarks``, each labelled with its benchmark name.

    ``task.max_eval_prompts`` applies to each benchmark; ``prompt_id`` becomes ``<benchmark>/<id>``.
    """
    from oapl.data.benchmarks import get_benchmark

    rows: list[dict[str, Any]] = []
    for name in cfg.eval_benchmarks:
        try:
            bench = get_benchmark(name)
        except ValueError as e:
            raise ValueError(f"task.eval_benchmarks: {e}") from None
        if bench.task != task_name:
            raise ValueError(
                f"task.eval_benchmarks: {name!r} is a {bench.task!r} benchmark but task.name is {task_name!r}"
            )
        raw, label = load_rows(bench.source, bench.split)
        if not raw:
            raise DatasetError(f"{label}: no rows (benchmark {name!r})")
        mapped = map_columns(
            raw, {"prompt": bench.prompt_column, "answer": bench.answer_column}, ["prompt", "answer"], label
        )
        for row in mapped[: cfg.max_eval_prompts] if cfg.max_eval_prompts else mapped:
            row["prompt_id"] = f"{bench.name}/{row['prompt_id']}"
            row["benchmark"] = bench.name
            rows.append(row)
    return rows


def _build_task(cfg: TaskConfig, seed: int) -> Task:
    name = cfg.name
    if name == "arithmetic":
        train, held = arithmetic_examples(cfg, seed)
        from oapl.rewards.arithmetic import arithmetic_reward

        fn = user_reward(cfg) or arithmetic_reward
        system = ARITHMETIC_SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt
        return Task(
            name,
            train[: cfg.max_prompts] if cfg.max_prompts else train,
            held[: cfg.max_eval_prompts] if cfg.max_eval_prompts else held,
            fn,
            ["answer"],
            system or None,
            cfg.prompt_template,
            _chat(cfg),
        )
    if name == "countdown":
        train, held = countdown_examples(cfg, seed)
        from oapl.rewards.countdown import countdown_reward

        fn = user_reward(cfg) or countdown_reward
        system = COUNTDOWN_SYSTEM_PROMPT if cfg.system_prompt is None else cfg.system_prompt
        return Task(
            name,
            train[: cfg.max_prompts] if cfg.max_prompts else train,
            held[: cfg.max_eval_prompts] if cfg.max_eval_prompts else held,
            fn,
            ["numbers", "target"],
            system or None,
            cfg.prompt_template,
            _chat(cfg, default=False),
        )
    if name == "code":
        return _code_task(cfg)
    if name in ("math", "dataset"):
        if not cfg.dataset:
            raise ValueError(f"task.dataset is required for task.name={name!r}")
        required = {"math": ["prompt", "answer"], "dataset": ["prompt"]}[name]
        train = _load_split(cfg, cfg.dataset, cfg.split, required, cfg.max_prompts)
        if cfg.eval_benchmarks:
            held = _benchmark_rows(cfg, name)
        else:
            held = (
                _load_split(
                    cfg, cfg.eval_dataset, cfg.eval_split, required, cfg.max_eval_prompts, cfg.eval_dataset_config
                )
                if cfg.eval_dataset
                else []
            )
        conversational = is_conversational(train[0].get("prompt"))
        if conversational and cfg.prompt_template != "{prompt}":
            raise ValueError(
                f"task.prompt_template={cfg.prompt_template!r} applies to text prompts, but the prompts "
                f"of {cfg.dataset} are message lists (TRL's conversational format); put the "
                "instruction in the messages, or leave task.prompt_template at '{prompt}'"
            )
        if name == "math":
            from oapl.rewards.math import MathVerifier

            fn = user_reward(cfg, conversational) or MathVerifier(timeout_s=cfg.reward_timeout_s)
            template = MATH_PROMPT_TEMPLATE if cfg.prompt_template == "{prompt}" else cfg.prompt_template
            columns = ["answer", "prompt"] if conversational and cfg.reward else ["answer"]
            return Task(name, train, held, fn, columns, cfg.system_prompt, template, _chat(cfg))
        if not cfg.reward:
            raise ValueError("task.reward (module:function) is required for task.name='dataset'")
        columns = sorted({k for row in train[:1] for k in row} - {"prompt", "prompt_id"})
        if conversational:
            columns.append("prompt")  # TRL passes a conversational row's messages as `prompts`
        reward = user_reward(cfg, conversational)
        assert reward is not None  # task.reward is set
        return Task(name, train, held, reward, columns, cfg.system_prompt, cfg.prompt_template, _chat(cfg))
    raise ValueError(f"task.name: unknown task {name!r}; use arithmetic, countdown, math, code or dataset")


def _chat(cfg: TaskConfig, default: bool = True) -> bool:
    """``task.chat_template``, or the task's default when it is unset."""
    return default if cfg.chat_template is None else cfg.chat_template


def _code_rows(source: str, split: str, config: str | None, limit: int | None) -> list[dict[str, Any]]:
    from oapl.data.code import load_deepcoder, load_livecodebench

    if "livecodebench" in source.lower():
        rows = load_livecodebench(source, limit=limit)
    else:
        rows = load_deepcoder(source, split, subsets=[config] if config else None, limit=limit)
    label = source.rsplit("/", 1)[-1]
    for i, row in enumerate(rows):
        row.setdefault("prompt_id", f"{label}-{split}-{i}")
        row["prompt_id"] = str(row["prompt_id"])
    return rows


def _code_task(cfg: TaskConfig) -> Task:
    """DeepCoder-format training data, LiveCodeBench (or DeepCoder-format) held-out data, sandboxed reward."""
    from oapl.rewards.code import code_reward

    if not cfg.dataset:
        raise ValueError("task.dataset is required for task.name='code' (a DeepCoder-format file or Hub name)")
    train = _code_rows(cfg.dataset, cfg.split, cfg.dataset_config, cfg.max_prompts)
    held = (
        _code_rows(cfg.eval_dataset, cfg.eval_split, cfg.eval_dataset_config, cfg.max_eval_prompts)
        if cfg.eval_dataset
        else []
    )
    fn = user_reward(cfg) or code_reward
    return Task("code", train, held, fn, ["tests", "metadata"], cfg.system_prompt, cfg.prompt_template, _chat(cfg))
