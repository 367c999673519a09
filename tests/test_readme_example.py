"""The README's Python example, run as a user would: a script, on CPU, with the embedded model (issue 14)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The example takes at most 5 minutes on CPU (issue 14): measured 224 s and 280 s on a 2-core machine
#: shared with other test runs (load average 5-9). The limit adds 40% for a busier CI machine
#: (OAPL_README_EXAMPLE_LIMIT_S overrides it); the time is printed.
LIMIT_S = float(os.environ.get("OAPL_README_EXAMPLE_LIMIT_S", "420"))


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python section has one example"
    return blocks[0]


def test_readme_example_is_the_public_api():
    code = readme_example()
    assert "from oapl import OAPLConfig, OAPLTrainer" in code
    assert 'model="embedded:smollm2-135m-instruct"' in code
    for call in ("trainer.train()", "trainer.evaluate()", "trainer.save_model("):
        assert call in code


@pytest.mark.slow
@pytest.mark.timeout(int(LIMIT_S) + 120)
def test_readme_example_runs_and_learns(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=LIMIT_S, env=env
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the README example took more than {LIMIT_S:.0f} s; its output: {str(e.stdout)[-2000:]}")
    seconds = time.perf_counter() - t0
    print(f"README example: {seconds:.0f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 4, proc.stdout  # the callback saw every step
    run = tmp_path / "runs" / "readme"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/pass@1"] for r in rows if "eval/pass@1" in r]
    assert len(evals) == 2, rows
    before, after = evals
    assert after > before + 0.15, (before, after)  # seen: 0.06 -> 0.34 (twice)
    assert f"'eval_pass@1': {after}" in proc.stdout  # trainer.evaluate() is the run's final evaluation
    assert (run / "model" / "model.safetensors").exists() and (run / "model" / "tokenizer.json").exists()
    config = (run / "config.yaml").read_text()
    assert "<in-memory:train_dataset:n=300:sha256=" in config and "<in-memory:reward:correct>" in config
