"""``oapl compare``: OAPL vs GRPO+IS, an OAPL lag sweep and a beta2 sweep over seeds, with a report."""

from __future__ import annotations

import argparse

from oapl.cli.args import fields_help, split_config


def _study_help() -> str:
    from oapl.compare import CompareConfig

    return fields_help(
        CompareConfig, "study fields (YAML keys, or key=value overrides; `base.*` takes any `oapl train` field):"
    )


def cmd_compare(args) -> int:
    from oapl.compare import command_line, load_compare_config, plan_runs, run_compare

    config, overrides = split_config(args)
    cc = load_compare_config(config, overrides, quick=args.quick)
    if args.dry_run:
        for r in plan_runs(cc, args.only):
            reuse = f" (= {r.same_as})" if r.same_as else ""
            print(
                f"{r.group:10s} {r.label:45s} seed={r.seed} steps={r.cfg.steps} "
                f"samples={r.cfg.steps * r.cfg.rollout.prompts_per_step * r.cfg.rollout.group_size} "
                f"-> {r.run_dir}{reuse}"
            )
        return 0
    if not args.report_only:
        from oapl.preflight import check_config

        planned = plan_runs(cc, args.only)
        if planned:
            check_config(planned[0].cfg)  # the shared model/dataset names fail now, naming their field
    parts = (
        ([config] if config else [])
        + overrides
        + (["--only", args.only] if args.only != "all" else [])
        + (["--quick"] if args.quick else [])
    )
    report = run_compare(
        cc, only=args.only, force=args.force, report_only=args.report_only, command=command_line(["compare", *parts])
    )
    print(f"report: {report}")
    return 0


def register(sub) -> None:
    """Add the ``compare`` subcommand to ``oapl``'s subparsers."""
    p = sub.add_parser(
        "compare",
        help="OAPL vs GRPO+IS on the same task, seeds and sample budget, plus an "
        "OAPL lag sweep; writes a Markdown + PNG report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_study_help(),
    )
    p.add_argument("config", nargs="?", help="study YAML (e.g. configs/compare_cpu.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. base.steps=20 seeds=[0,1] lag_sweep.intervals=[1,10]"
    )
    p.add_argument(
        "--only",
        choices=["all", "algorithms", "lag", "beta2"],
        default="all",
        help="run only the head-to-head comparison, the lag sweep or the beta2 sweep (invocations "
        "may run side by side; each resumes its runs, the plain command writes the full report)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="apply the study's `quick` section (a short version: "
        "fewer seeds, steps and prompts), into its own output folder",
    )
    p.add_argument("--force", action="store_true", help="retrain runs that are already complete")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from existing run directories")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.set_defaults(func=cmd_compare)
