"""Code-execution reward: extraction, test formats, comparison, loaders, fail-closed policy.

Run: ``python -m pytest tests/test_code_reward.py -q``
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from oapl.data.code import (
    LCB_VERSION_FILES,
    build_code_prompt,
    decode_lcb_private_tests,
    load_deepcoder,
    load_livecodebench,
)
from oapl.rewards import code as code_mod
from oapl.rewards.code import (
    code_reward,
    compare_functional,
    compare_stdout,
    evaluate_completions,
    extract_code,
    make_code_reward,
    parse_tests,
)
from oapl.rewards.sandbox import ProgramJob, SandboxConfig, SandboxRunner, SandboxUnavailableError, probe_namespaces
from oapl.rewards.sandbox import runner as runner_mod

FIXTURE = Path(__file__).parent / "fixtures" / "code_problems.jsonl"
SRC = Path(__file__).resolve().parents[1] / "src"
CFG = SandboxConfig(timeout_s=5.0, total_deadline_s=30.0, memory_mb=512, workers=2)


def fenced(code: str, lang: str = "python") -> str:
    return f"Here is my solution.\n```{lang}\n{code}```\nDone."


@pytest.fixture(scope="module")
def reward():
    return make_code_reward(CFG)


@pytest.fixture(scope="module")
def problems():
    return load_deepcoder(FIXTURE, keep_columns=("solution",))


def call(reward_fn, rows, completions):
    return reward_fn(
        prompts=[r["prompt"] for r in rows],
        completions=completions,
        tests=[r["tests"] for r in rows],
        metadata=[r["metadata"] for r in rows],
    )


# --------------------------------------------------------------------------- extraction


def test_extract_code_takes_last_fenced_block():
    text = "```python\nprint(1)\n```\nthen better:\n```py\nprint(2)\n```\ntrailing"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("no code here") is None
    assert extract_code("```python\n   \n```") is None  # empty block
    assert extract_code("```python\nprint(1)\n") is None  # unterminated block
    assert extract_code(None) is None  # type: ignore[arg-type]


def test_completion_text_accepts_trl_conversational_format():
    conv = [{"role": "assistant", "content": fenced("print(3)\n")}]
    assert extract_code(code_mod.completion_text(conv)) == "print(3)\n"
    parts = [{"role": "assistant", "content": [{"type": "text", "text": fenced("print(4)\n")}]}]
    assert extract_code(code_mod.completion_text(parts)) == "print(4)\n"
    assert code_mod.completion_text(12345) == ""


# --------------------------------------------------------------------------- test formats


def test_parse_tests_livecodebench_list_and_json_string():
    raw = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    for value in (raw, json.dumps(raw)):
        (t,) = parse_tests(value)
        assert (t.input, t.output, t.testtype) == ("1 2\n", "3\n", "stdin")
    fn = [{"input": "[1,2]\n3", "output": "[3, 6]", "testtype": "functional"}]
    (t,) = parse_tests(fn, {"func_name": "scale"})
    assert t.input == [[1, 2], 3] and t.output == [3, 6] and t.func_name == "scale"
    (t,) = parse_tests(fn, json.dumps({"func_name": "scale"}))  # metadata as JSON string
    assert t.func_name == "scale"


def test_parse_tests_taco_primeintellect_and_invalid():
    taco = {"inputs": ["1\n", ["2", "3"]], "outputs": ["a\n", ["b", "c"]]}
    tests = parse_tests(json.dumps(taco))
    assert [t.input for t in tests] == ["1\n", "2\n3"] and tests[1].output == "b\nc"
    taco_fn = {"fn_name": "f", "inputs": [[1, 2]], "outputs": [[[3, 4]]]}
    (t,) = parse_tests(taco_fn)
    assert t.testtype == "functional" and t.input == [1, 2]
    assert t.output == [[3, 4]] and t.alternatives == ([3, 4],)
    prime = "[{'type': 'function_call', 'fn_name': 'g', 'input': [5], 'output': [25]}]"
    (t,) = parse_tests(prime)
    assert (t.func_name, t.input, t.output) == ("g", [5], [25])
    assert parse_tests("not json") == []
    assert parse_tests(None) == []
    assert parse_tests([{"input": "[1]", "output": "1", "testtype": "functional"}]) == []  # no name
    assert parse_tests([{"input": "{bad", "output": "1", "testtype": "functional"}], {"func_name": "f"}) == []


# --------------------------------------------------------------------------- comparison


def test_compare_stdout_follows_livecodebench():
    assert compare_stdout("3\n", "3")
    assert compare_stdout("  a b  \n\n", "a b")
    assert compare_stdout("1 2\n3 4\n", "1 2\r\n3 4")  # lines are stripped
    assert compare_stdout("6.000000", "6.0") and compare_stdout("1e2", "100")
    assert not compare_stdout("0.3333", "0.33333")
    assert compare_stdout("0.3333", "0.33333", float_tolerance=1e-3)
    assert not compare_stdout("1\n2", "1 2")  # line structure matters
    assert not compare_stdout("YES", "yes")
    assert not compare_stdout("", "0")
    assert not compare_stdout(None, "1")  # type: ignore[arg-type]


def test_float_tolerance_overflow_is_a_quiet_wrong_answer(caplog):
    huge = "1E+999999999999999999"
    with caplog.at_level(logging.DEBUG, logger="oapl.rewards.code"):
        assert not compare_stdout(huge, "2", float_tolerance=1e-6)
        assert not compare_stdout("9E+999999999999999999", "-9E+999999999999999999", float_tolerance=1e-6)
        assert compare_stdout(huge, huge, float_tolerance=1e-6)  # equal is equal
        assert compare_stdout("1e400", "1.0000001e400", float_tolerance=1e-6)  # large but comparable
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("scored as wrong" in r.getMessage() for r in caplog.records)


def test_float_tolerance_overflow_through_the_sandbox_logs_no_error(caplog):
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    reward = make_code_reward(CFG, float_tolerance=1e-6)
    with caplog.at_level(logging.DEBUG):
        out = reward(["p"], ["```python\nprint('1E+999999999999999999')\n```"], tests=[tests], metadata=[None])
    assert out == [0.0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_compare_functional():
    assert compare_functional("[1, 2]", [1, 2])
    assert compare_functional("1.0", 1)  # Python equality, as LiveCodeBench
    assert not compare_functional("[2, 1]", [1, 2])
    assert not compare_functional(None, 1)
    assert not compare_functional("{bad", 1)
    assert compare_functional("[3, 4]", [[3, 4]], alternatives=([3, 4],))


# --------------------------------------------------------------------------- reward


def test_every_reference_solution_scores_one(reward, problems):
    assert len(problems) >= 6
    kinds = {t["testtype"] for p in problems for t in p["tests"]}
    assert kinds == {"stdin", "functional"}
    scores = call(reward, problems, [fenced(p["solution"]) for p in problems])
    assert scores == [1.0] * len(problems)


def test_wrong_or_unusable_answers_score_zero(reward, problems):
    twosum = next(p for p in problems if p["metadata"]["func_name"] == "twoSum")
    stdin_p = problems[0]
    cases = [
        (stdin_p, fenced(stdin_p["solution"].replace("a[-1] + a[-2]", "a[-1] + a[0]"))),
        (stdin_p, "I think the answer is 8."),  # no code block
        (stdin_p, fenced("def broken(:\n    pass\n")),  # syntax error
        (twosum, fenced(twosum["solution"].replace("def twoSum", "def two_sum"))),  # wrong name
        (twosum, fenced("class Solution:\n    def twoSum(self, nums, target):\n        return (0, 1)\n")),
        (stdin_p, fenced("print(8)\n", lang="cpp")),  # passes the first test only
    ]
    rows = [c[0] for c in cases]
    scores = call(reward, rows, [c[1] for c in cases])
    assert scores == [0.0] * len(cases)


def test_tuple_results_become_lists(reward, problems):
    twosum = next(p for p in problems if p["metadata"]["func_name"] == "twoSum")
    code = twosum["solution"].replace("return [seen[target - x], i]", "return (seen[target - x], i)")
    assert call(reward, [twosum], [fenced(code)]) == [1.0]


def test_missing_or_bad_columns_never_raise(reward):
    assert reward(prompts=["p"], completions=[fenced("print(1)\n")]) == [0.0]  # no tests column
    assert reward(prompts=["p"], completions=[fenced("print(1)\n")], tests=[[]]) == [0.0]
    assert reward(prompts=["p"], completions=[fenced("print(1)\n")], tests=["{{{"]) == [0.0]
    assert reward(prompts=[], completions=[], tests=[]) == []
    weird = reward(prompts=["p", "q"], completions=[None, 42], tests=[None, 7], metadata=[3, "x"])
    assert weird == [0.0, 0.0]


def test_trl_calling_convention_and_conversational_completions(reward, problems):
    rows = problems[:2]
    completions = [[{"role": "assistant", "content": fenced(r["solution"])}] for r in rows]
    scores = reward(
        prompts=[[{"role": "user", "content": r["prompt"]}] for r in rows],
        completions=completions,
        completion_ids=[[1], [2]],
        tests=[r["tests"] for r in rows],
        metadata=[r["metadata"] for r in rows],
        trainer_state=None,
        solution=[r["solution"] for r in rows],
    )
    assert scores == [1.0, 1.0] and all(isinstance(s, float) for s in scores)


def test_module_level_code_reward_uses_defaults(problems):
    p = problems[0]
    assert code_reward([p["prompt"]], [fenced(p["solution"])], tests=[p["tests"]]) == [1.0]
    assert code_reward([p["prompt"]], [fenced("print(0)\n")], tests=[p["tests"]]) == [0.0]


def test_batch_results_stay_aligned_and_deterministic(problems):
    rows, completions = [], []
    for i, p in enumerate(problems):
        rows.append(p)
        completions.append(fenced(p["solution"]) if i % 2 == 0 else fenced("print('nope')\n"))
    expected = [1.0 if i % 2 == 0 else 0.0 for i in range(len(problems))]
    serial = make_code_reward(SandboxConfig(timeout_s=5, workers=1))
    parallel = make_code_reward(SandboxConfig(timeout_s=5, workers=2))
    assert call(serial, rows, completions) == expected
    assert call(parallel, rows, completions) == expected


def test_programs_are_deterministic(reward):
    # random, hash-ordered sets of strings: same program + input => same output.
    code = (
        "import random\nwords = {'alpha','beta','gamma','delta','omega'}\n"
        "print(random.randint(0, 10**9), ' '.join(words))\n"
    )
    runner = SandboxRunner(CFG)
    outs = {runner.run(ProgramJob(code=code, mode="stdin", inputs=[""])).runs[0].stdout for _ in range(3)}
    assert len(outs) == 1 and outs.pop().strip()


def test_competitive_programming_idioms(reward):
    tests = [{"input": "3\n", "output": "6\n", "testtype": "stdin"}]
    programs = [
        # deep recursion in a thread with a big stack, no join
        "import sys, threading\nsys.setrecursionlimit(10**6)\nthreading.stack_size(1 << 26)\n"
        "def main():\n    def f(n): return 0 if n == 0 else n + f(n - 1)\n"
        "    n = int(input()); f(50000); print(n * 2)\nthreading.Thread(target=main).start()\n",
        # buffered output flushed by an atexit hook (PyRival style)
        "import atexit, io, sys\nbuf = io.StringIO()\natexit.register(lambda: sys.stdout.write(buf.getvalue()))\n"
        "buf.write(str(int(sys.stdin.readline()) * 2) + '\\n')\n",
        # exit(0) after answering; open(0) reading; __main__ guard
        "import sys\ndef main():\n    print(int(open(0).read()) * 2)\n    sys.exit(0)\n"
        "if __name__ == '__main__':\n    main()\n",
        # LiveCodeBench import header: names usable without imports
        "print(reduce(lambda a, b: a + b, [int(input())] * 2))\n",
    ]
    scores = reward(
        prompts=[""] * len(programs), completions=[fenced(p) for p in programs], tests=[tests] * len(programs)
    )
    assert scores == [1.0] * len(programs)


def test_first_failure_stops_the_program():
    tests = [{"input": str(i), "output": str(i), "testtype": "stdin"} for i in range(5)]
    (ev,) = evaluate_completions([fenced("print(0)\n")], [tests], runner=SandboxRunner(CFG))
    assert ev.reward == 0.0 and ev.reason == "test 1: wrong answer"
    assert len(ev.results[0].runs) == 2  # stopped right after the first failing test


def test_total_deadline_bounds_a_program():
    cfg = SandboxConfig(timeout_s=1.0, total_deadline_s=1.2, workers=1)
    tests = [{"input": "", "output": "ok", "testtype": "stdin"}] * 6
    code = "import time\ntime.sleep(0.5)\nprint('ok')\n"
    (ev,) = evaluate_completions([fenced(code)], [tests], runner=SandboxRunner(cfg))
    assert ev.reward == 0.0
    statuses = [r.status for r in ev.results[0].runs]
    assert statuses[-1] in ("deadline", "timeout") and statuses[0] == "ok"
    assert len(statuses) < 6


def test_max_tests_keeps_the_longest_inputs():
    tests = [{"input": "x" * n, "output": str(n), "testtype": "stdin"} for n in (1, 50, 5, 20)]
    code = "print(len(input()))\n"
    (ev,) = evaluate_completions([fenced(code)], [tests], runner=SandboxRunner(CFG), max_tests=2)
    assert ev.reward == 1.0 and ev.n_tests == 2
    assert [r.stdout.strip() for r in ev.results[0].runs] == ["50", "20"]


def test_config_validation():
    with pytest.raises(ValueError):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError):
        SandboxConfig(memory_mb=8)
    with pytest.raises(ValueError):
        SandboxConfig(isolation="none")  # needs allow_no_netns=True
    with pytest.raises(ValueError):
        SandboxConfig(isolation="docker")
    assert SandboxConfig(workers=3).n_workers == 3 and SandboxConfig().n_workers >= 1


# --------------------------------------------------------------------------- isolation policy


def test_probe_reports_network_isolation_here():
    facts = probe_namespaces(SandboxConfig())
    if not facts["ok"]:
        pytest.skip(f"namespaces unavailable on this host: {facts['error']}")
    assert facts["netns"] and facts["pidns"] and facts["mountns"]
    assert facts["interfaces"] == ["lo"]
    assert facts["fs"] in ("pivot_root", "chroot")


def test_fail_closed_when_namespaces_are_unavailable(monkeypatch):
    simulated = probe_namespaces(SandboxConfig(), _simulate_failure=True)
    assert simulated["ok"] is False and "unshare" in simulated["error"]
    monkeypatch.setattr(SandboxRunner, "_probe", lambda self: simulated)
    reward_fn = make_code_reward(SandboxConfig(timeout_s=2))
    tests = [[{"input": "", "output": "1", "testtype": "stdin"}]]
    with pytest.raises(SandboxUnavailableError) as info:
        reward_fn(prompts=[""], completions=[fenced("print(1)\n")], tests=tests)
    message = str(info.value)
    assert "allow_no_netns=True" in message and "fail closed" in message
    # isolation="namespaces" never degrades, even with allow_no_netns.
    strict = SandboxRunner(SandboxConfig(isolation="namespaces", allow_no_netns=True))
    with pytest.raises(SandboxUnavailableError):
        strict.isolation_mode()


def test_opt_out_runs_degraded_with_warning(monkeypatch, caplog, problems):
    simulated = probe_namespaces(SandboxConfig(), _simulate_failure=True)
    monkeypatch.setattr(SandboxRunner, "_probe", lambda self: simulated)
    monkeypatch.setattr(runner_mod, "_warned_degraded", False)
    reward_fn = make_code_reward(SandboxConfig(timeout_s=5, allow_no_netns=True, workers=2))
    with caplog.at_level(logging.WARNING, logger="oapl.rewards.sandbox.runner"):
        scores = call(reward_fn, problems, [fenced(p["solution"]) for p in problems])
    assert scores == [1.0] * len(problems)
    assert reward_fn.runner.isolation_mode() == "none"
    assert any("WITHOUT namespaces" in r.message for r in caplog.records)
    res = reward_fn.runner.run(ProgramJob(code="print(1)", mode="stdin", inputs=[""]))
    assert res.isolation["netns"] is False and res.passed


def test_isolation_failure_mid_run_retries_then_fails_closed(monkeypatch):
    runner = SandboxRunner(CFG)
    runner.isolation_mode()
    job = ProgramJob(code="print(7)", mode="stdin", inputs=[""], check=lambda r: r.stdout == "7\n")
    real_launch, calls = runner_mod.launch, []

    def flaky(config, job, isolation, on_run=None, extra_spec=None):
        calls.append(isolation)
        if len(calls) == 1:
            return [], {"type": "ready", "error": "simulated"}, "isolation: simulated", []
        return real_launch(config, job, isolation, on_run=on_run, extra_spec=extra_spec)

    monkeypatch.setattr(runner_mod, "launch", flaky)
    assert runner.run(job).passed and calls == ["namespaces", "namespaces"]
    monkeypatch.setattr(runner_mod, "launch", lambda *a, **k: ([], {}, "isolation: simulated", []))
    with pytest.raises(SandboxUnavailableError):
        runner.run(job)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unprivileged_trainer_uses_a_user_namespace():
    """The non-root path: user+net+pid+mount namespaces, no capabilities."""
    python = shutil.which("python3", path="/usr/bin:/bin") or ""
    setpriv = shutil.which("setpriv")
    if not python or not setpriv:
        pytest.skip("needs /usr/bin/python3 and setpriv to run as an unprivileged user")
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    # A checkout under a private folder (e.g. `mktemp -d`, mode 0700) is invisible to that user: then
    # the import fails with ModuleNotFoundError, not "Permission denied", so ask the user first.
    init = SRC / "oapl" / "__init__.py"
    probe = subprocess.run(
        as_nobody + ["-c", f"import os, sys; sys.exit(0 if os.access({str(init)!r}, os.R_OK) else 3)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=env,
    )
    if probe.returncode != 0:
        pytest.skip(f"an unprivileged user cannot read {init} here (rc {probe.returncode}) {probe.stderr[-200:]}")
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(SRC)!r})\n"
        "from oapl.rewards.sandbox import SandboxConfig, SandboxRunner, ProgramJob, probe_namespaces\n"
        "cfg = SandboxConfig(timeout_s=3)\n"
        "facts = probe_namespaces(cfg)\n"
        "out = {'facts': facts}\n"
        "if facts['ok']:\n"
        '    code = ("import os, socket\\n"\n'
        "            \"caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0]\\n\"\n"
        "            \"try:\\n    socket.create_connection(('127.0.0.1', 9), timeout=1); net = 'open'\\n\"\n"
        '            "except OSError as e:\\n    net = str(e.errno)\\n"\n'
        '            "import ctypes\\nuserns = ctypes.CDLL(None).unshare(0x10000000)\\n"\n'
        '            "print(caps.split()[1], net, userns, int(input()) * 2)\\n")\n'
        "    res = SandboxRunner(cfg).run(ProgramJob(code=code, mode='stdin', inputs=['21\\n']))\n"
        "    out['run'] = [res.runs[0].status, res.runs[0].stdout]\n"
        "else:\n"
        "    try:\n"
        "        SandboxRunner(cfg).isolation_mode()\n"
        "    except Exception as exc:\n"
        "        out['error'] = str(exc)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(as_nobody + ["-c", script], capture_output=True, text=True, timeout=60, cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["facts"]["ok"]:
        # The OS forbids unprivileged user namespaces: the runner must fail closed, clearly.
        assert "allow_no_netns=True" in out["error"]
        pytest.skip(f"unprivileged user namespaces are forbidden here: {out['facts']['error']}")
    assert out["facts"]["userns"] is True and out["facts"]["netns"] is True
    status, stdout = out["run"]
    caps, net, userns, answer = stdout.split()
    assert status == "ok" and answer == "42"
    assert int(caps, 16) == 0  # no capabilities at all
    assert userns == "-1"  # no nested user namespace (which would bring a full capability set)
    assert net == "101"  # ENETUNREACH: only a downed loopback exists


# --------------------------------------------------------------------------- loaders


def test_build_code_prompt_includes_instructions_and_starter():
    with_starter = build_code_prompt("Add two numbers.", "class Solution:\n    def add(self, a, b):\n")
    assert "Question: Add two numbers." in with_starter
    assert "```python\nclass Solution:" in with_starter
    plain = build_code_prompt("Add two numbers.")
    assert "stdin" in plain and "```python\n# YOUR CODE HERE\n```" in plain


def test_load_deepcoder_local_rows(problems):
    for row in problems:
        assert set(row) == {"prompt", "tests", "metadata", "solution"}
        assert "```python" in row["prompt"]
        assert all(set(t) == {"input", "output", "testtype"} for t in row["tests"])
        assert all(isinstance(t["input"], str) and isinstance(t["output"], str) for t in row["tests"])
        if row["metadata"]["starter_code"]:
            assert row["metadata"]["starter_code"].strip() in row["prompt"]
    fn_rows = [r for r in problems if r["metadata"]["func_name"]]
    assert {r["metadata"]["func_name"] for r in fn_rows} >= {"twoSum", "digital_root"}
    assert load_deepcoder(FIXTURE, limit=3).__len__() == 3


def test_load_deepcoder_hub_path(monkeypatch):
    import datasets

    calls = []
    row = {
        "problem": "Print 1.",
        "tests": json.dumps([{"input": "", "output": "1", "testtype": "stdin"}]),
        "metadata": "{}",
    }

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return [row]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_deepcoder("agentica-org/DeepCoder-Preview-Dataset", "train")
    assert calls == [
        ("agentica-org/DeepCoder-Preview-Dataset", s, "train") for s in ("primeintellect", "taco", "lcbv5")
    ]
    assert len(rows) == 3 and rows[0]["metadata"]["source"] == "primeintellect"
    load_deepcoder("agentica-org/DeepCoder-Preview-Dataset", "test", subsets=["codeforces"])
    assert calls[-1] == ("agentica-org/DeepCoder-Preview-Dataset", "codeforces", "test")


def _lcb_encode(tests: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def _write_lcb_fixture(path: Path, problems: list[dict]) -> None:
    lines = []
    for i, p in enumerate(problems):
        tests = p["tests"]
        lines.append(
            json.dumps(
                {
                    "question_title": f"p{i}",
                    "question_content": p["prompt"].split("Question: ")[1],
                    "platform": "leetcode" if p["metadata"]["func_name"] else "atcoder",
                    "question_id": str(1000 + i),
                    "contest_id": "c1",
                    "contest_date": f"2024-0{1 + i % 9}-15T00:00:00",
                    "starter_code": p["metadata"]["starter_code"] or "",
                    "difficulty": ["easy", "medium", "hard"][i % 3],
                    "public_test_cases": json.dumps(tests[:1]),
                    "private_test_cases": _lcb_encode(tests[1:]) if i % 2 else json.dumps(tests[1:]),
                    "metadata": json.dumps(
                        {"func_name": p["metadata"]["func_name"]} if p["metadata"]["func_name"] else {}
                    ),
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")


def test_load_livecodebench_local_file_and_filters(tmp_path, problems, reward):
    path = tmp_path / "lcb.jsonl"
    _write_lcb_fixture(path, problems)
    rows = load_livecodebench(path)
    assert len(rows) == len(problems)
    assert [len(r["tests"]) for r in rows] == [len(p["tests"]) for p in problems]  # public+private
    by_id = {r["metadata"]["question_id"]: r for r in rows}
    solutions = [fenced(p["solution"]) for p in problems]
    ordered = [by_id[str(1000 + i)] for i in range(len(problems))]
    assert call(reward, ordered, solutions) == [1.0] * len(problems)
    public_only = load_livecodebench(path, include_private=False)
    assert all(len(r["tests"]) == 1 for r in public_only)
    assert {r["metadata"]["platform"] for r in load_livecodebench(path, platform="leetcode")} == {"leetcode"}
    assert all(r["metadata"]["difficulty"] == "hard" for r in load_livecodebench(path, difficulty="hard"))
    dated = load_livecodebench(path, start_date="2024-03-01", end_date="2024-05-31")
    assert dated and all("2024-03" <= r["metadata"]["contest_date"][:7] <= "2024-05" for r in dated)
    assert len(load_livecodebench(path, limit=2)) == 2


def test_load_livecodebench_hub_path(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(builder, data_files=None, split=None, **kw):
        seen.update(builder=builder, data_files=data_files, split=split)
        return []

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_livecodebench("livecodebench/code_generation_lite", version_tag="release_v2") == []
    assert seen == {
        "builder": "json",
        "split": "train",
        "data_files": [
            "hf://datasets/livecodebench/code_generation_lite/test.jsonl",
            "hf://datasets/livecodebench/code_generation_lite/test2.jsonl",
        ],
    }
    assert LCB_VERSION_FILES["v2_v4"] == ["test2.jsonl", "test3.jsonl", "test4.jsonl"]
    assert LCB_VERSION_FILES["release_v6"][-1] == "test6.jsonl"
    with pytest.raises(ValueError):
        load_livecodebench("livecodebench/code_generation_lite", version_tag="release_v99")


def test_lcb_private_tests_never_unpickle_code(tmp_path):
    canary = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    assert decode_lcb_private_tests(blob) == []
    assert not canary.exists()
    good = [{"input": "1", "output": "2", "testtype": "stdin"}]
    assert decode_lcb_private_tests(_lcb_encode(good)) == good
    assert decode_lcb_private_tests(json.dumps(good)) == good
    assert decode_lcb_private_tests("%%%") == [] and decode_lcb_private_tests(None) == []


def test_runner_never_leaks_temp_dirs():
    from test_code_sandbox_adversarial import sandbox_dirs  # this run's folders (not another run's beside it)

    before = sandbox_dirs()
    runner = SandboxRunner(CFG)
    runner.run(ProgramJob(code="open('f', 'w').write('x' * 100)\nprint(1)", mode="stdin", inputs=[""]))
    assert sandbox_dirs() <= before


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
