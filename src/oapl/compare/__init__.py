"""``oapl compare``: OAPL against GRPO+IS, an OAPL policy-lag sweep and a beta2 sweep, over several seeds.

The evidence behind OAPL's claims is comparative (arXiv 2602.19362): held-out Pass@k at least that
of GRPO with truncated importance sampling at equal training samples, better at large k, entropy
kept rather than collapsed, stable training with a large lag ``L`` between the trainer and the
inference engine. This package reruns those comparisons with the library's own training loop
(:func:`oapl.loop.train`) and says, claim by claim, whether the runs reproduce them.

* :mod:`~oapl.compare.plan` — the study (:class:`CompareConfig`) and its runs. Every run starts from
  the same ``base`` configuration, so all runs see the **same sample budget** (``steps x
  prompts_per_step x group_size`` responses) and the same held-out split; ``algorithms`` are the
  head-to-head runs (default: OAPL and GRPO+IS with 2 mini-batches and off-by-one asynchrony),
  ``lag_sweep`` reruns OAPL at each ``L``, ``beta2_sweep`` at each beta2 on seeds of its own. Each
  configuration runs once per seed.
* :mod:`~oapl.compare.runner` — trains what is missing. A finished run is reused; an interrupted
  one resumes from its latest checkpoint (taken at sync boundaries), so a study runs in as many
  invocations as needed. Then every final policy (and the base model, once) is evaluated on the
  held-out prompts with ``n`` samples each, per prompt (:mod:`oapl.evaluation.policy_eval`).
* :mod:`~oapl.compare.results` — each configuration's final evaluations over seeds: means with
  t-intervals, paired per-prompt differences with an interval over seeds (the experimental unit).
* :mod:`~oapl.compare.claims` — every arm against the base model, whether GRPO+IS's correction
  acted, and a verdict per claim by the rules the study's ``claims`` section declares before it runs.
* :mod:`~oapl.compare.tables` and :mod:`~oapl.compare.report` — the Markdown report, its tables and
  figures.
"""

from __future__ import annotations

import shlex
import sys

from oapl.compare.plan import (
    Beta2SweepConfig,
    ClaimsConfig,
    CompareConfig,
    FinalEvalConfig,
    LagSweepConfig,
    PlannedRun,
    load_compare_config,
    plan_runs,
)
from oapl.compare.report import build_report
from oapl.compare.runner import run_compare
from oapl.compare.summary import summarize_run

__all__ = [
    "Beta2SweepConfig",
    "ClaimsConfig",
    "CompareConfig",
    "FinalEvalConfig",
    "LagSweepConfig",
    "PlannedRun",
    "build_report",
    "command_line",
    "load_compare_config",
    "plan_runs",
    "run_compare",
    "summarize_run",
]


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "oapl " + " ".join(shlex.quote(a) for a in args)
