"""Evaluation benchmarks by name (Hugging Face Hub datasets, for users with internet).

Each entry says where the data lives and which columns hold the problem and the answer, so
``oapl eval CONFIG --benchmarks aime25,hmmt25_feb`` builds the math task for each and reports Pass@k
per benchmark. ``source`` may also be a local file in the same schema (how the tests run it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str
    split: str
    prompt_column: str
    answer_column: str
    task: str = "math"


BENCHMARKS: dict[str, Benchmark] = {
    "aime25": Benchmark("aime25", "MathArena/aime_2025", "train", "problem", "answer"),
    "hmmt25_feb": Benchmark("hmmt25_feb", "MathArena/hmmt_feb_2025", "train", "problem", "answer"),
    "hmmt25_nov": Benchmark("hmmt25_nov", "MathArena/hmmt_nov_2025", "train", "problem", "answer"),
    "brumo25": Benchmark("brumo25", "MathArena/brumo_2025", "train", "problem", "answer"),
    "deepscaler": Benchmark("deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", "train", "problem", "answer"),
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}") from None


def task_overrides(bench: Benchmark) -> dict[str, object]:
    """Config changes that make ``task`` evaluate on ``bench``."""
    return {
        "task.name": bench.task,
        "task.dataset": bench.source,
        "task.split": bench.split,
        "task.eval_dataset": bench.source,
        "task.eval_split": bench.split,
        "task.columns": {"prompt": bench.prompt_column, "answer": bench.answer_column},
    }
