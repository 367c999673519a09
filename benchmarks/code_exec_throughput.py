"""Throughput of the sandboxed code reward: test executions per second.

Two workloads, both through the public reward function (extraction, sandbox,
comparison), with the reference solutions of ``tests/fixtures/code_problems.jsonl``:

* ``batch``: many completions (fixture problems repeated), a few tests each,
  programs in parallel across ``--workers`` (the RL-training shape);
* ``many-tests``: one program with ``--tests`` test cases (per-test cost inside
  one sandbox).

Usage::

    python benchmarks/code_exec_throughput.py                # defaults
    python benchmarks/code_exec_throughput.py --repeats 16 --workers 4 --tests 200

Prints one line per workload plus the isolation mode that was used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from oapl.data.code import load_deepcoder  # noqa: E402
from oapl.rewards.code import make_code_reward  # noqa: E402
from oapl.rewards.sandbox import SandboxConfig  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "code_problems.jsonl"


def fenced(code: str) -> str:
    return f"```python\n{code}```"


def bench_batch(reward, problems, repeats: int) -> dict:
    rows = problems * repeats
    completions = [fenced(r["solution"]) for r in rows]
    n_tests = sum(len(r["tests"]) for r in rows)
    t0 = time.perf_counter()
    scores = reward(
        prompts=[r["prompt"] for r in rows],
        completions=completions,
        tests=[r["tests"] for r in rows],
        metadata=[r["metadata"] for r in rows],
    )
    dt = time.perf_counter() - t0
    assert scores == [1.0] * len(rows), scores
    return {
        "workload": "batch",
        "programs": len(rows),
        "test_executions": n_tests,
        "seconds": dt,
        "tests_per_s": n_tests / dt,
        "programs_per_s": len(rows) / dt,
    }


def bench_many_tests(reward, n_tests: int) -> dict:
    tests = [{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n", "testtype": "stdin"} for i in range(n_tests)]
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    t0 = time.perf_counter()
    scores = reward(prompts=[""], completions=[fenced(code)], tests=[tests])
    dt = time.perf_counter() - t0
    assert scores == [1.0], scores
    return {
        "workload": "many-tests",
        "programs": 1,
        "test_executions": n_tests,
        "seconds": dt,
        "tests_per_s": n_tests / dt,
        "programs_per_s": 1 / dt,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="fixture copies in the batch")
    parser.add_argument("--workers", type=int, default=0, help="parallel programs (0 = #CPUs)")
    parser.add_argument("--tests", type=int, default=100, help="tests in the many-tests workload")
    parser.add_argument("--json", action="store_true", help="also print results as JSON")
    args = parser.parse_args(argv)

    config = SandboxConfig(timeout_s=6.0, workers=args.workers)
    reward = make_code_reward(config)
    problems = load_deepcoder(FIXTURE, keep_columns=("solution",))
    mode = reward.runner.isolation_mode()  # probe once, outside the timings
    print(
        f"host: {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"euid {os.geteuid()}, isolation={mode}, workers={config.n_workers}, "
        f"cgroups={reward.runner.facts.get('cgroups')}"
    )
    results = [bench_batch(reward, problems, args.repeats), bench_many_tests(reward, args.tests)]
    for r in results:
        print(
            f"{r['workload']:>10}: {r['programs']:4d} programs, {r['test_executions']:5d} test "
            f"executions in {r['seconds']:.2f}s -> {r['tests_per_s']:.1f} tests/s, "
            f"{r['programs_per_s']:.1f} programs/s"
        )
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
