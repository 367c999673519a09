"""``oapl generate``, ``oapl eval``, ``oapl plot`` and ``oapl two-stage``: the rollout data product."""

from __future__ import annotations

import json
from pathlib import Path

from oapl.cli.args import add_config_args, split_config


def _cfg(args):
    from oapl.config import load_config

    config, overrides = split_config(args)
    return load_config(config, overrides)


def cmd_generate(args) -> int:
    from oapl.generate import generate_dataset

    cfg = _cfg(args)
    from oapl.preflight import check_config

    check_config(cfg, model=args.model)  # a wrong model/dataset name fails now, naming its field
    out = generate_dataset(
        cfg,
        args.out,
        split=args.split,
        n=args.n,
        model=args.model,
        max_prompts=args.max_prompts,
        subset=args.subset,
        subset_seed=args.subset_seed,
        benchmark=args.benchmark or cfg.task.name,
    )
    print(json.dumps(out, indent=2))
    return 0


def _require(paths: dict[str, str], what: str, flag: str) -> None:
    """Every input file exists before anything is loaded; the message names the argument."""
    from oapl.errors import UserError

    for label, path in paths.items():
        if not Path(path).exists():
            arg = path if label == path else f"{label}={path}"
            raise UserError(f"{flag}: {arg}: no {what} at {path}")


def cmd_eval(args) -> int:
    from oapl.config_views import eval_sampling_params
    from oapl.data.rollouts import read_rollouts
    from oapl.evaluation.passk import OVERALL, evaluate_groups, write_report
    from oapl.generate import generate_dataset

    prefix = Path(args.out)
    sources = list(args.rollouts or [])
    _require({s: s for s in sources}, "rollout dataset (a file or folder from `oapl generate`)", "--rollouts")
    if not sources:
        from oapl.preflight import check_config

        check_config(_cfg(args), model=args.model)  # before loading anything
    if args.benchmarks:  # named benchmarks, each generated on and scored
        from oapl.data.benchmarks import get_benchmark, task_overrides
        from oapl.config_views import with_updates

        base = _cfg(args)
        params = eval_sampling_params(base, n=args.n)
        for name in args.benchmarks.split(","):
            bench = get_benchmark(name.strip())
            cfg = with_updates(base, task_overrides(bench))
            data_dir = prefix.parent / f"{prefix.name}_rollouts" / bench.name
            generate_dataset(
                cfg,
                data_dir,
                split="eval",
                model=args.model,
                params=params,
                max_prompts=args.max_prompts,
                benchmark=bench.name,
            )
            sources.append(str(data_dir))
    if not sources:  # generate on the held-out split first
        cfg = _cfg(args)
        params = eval_sampling_params(cfg, n=args.n)
        data_dir = prefix.parent / f"{prefix.name}_rollouts"
        generate_dataset(
            cfg,
            data_dir,
            split="eval",
            model=args.model,
            params=params,
            max_prompts=args.max_prompts,
            benchmark=args.benchmark or cfg.task.name,
        )
        sources = [str(data_dir)]
    groups = [g for s in sources for g in read_rollouts(s, with_tokens=False)]
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    result = evaluate_groups(groups, ks=ks, threshold=args.threshold)
    json_path, csv_path = write_report(result, prefix)
    for row in result[OVERALL]["pass_at_k"]:
        print(f"pass@{row['k']}: {row['mean']:.4f} (std {row['std']:.4f}, {row['num_prompts']} prompts)")
    print(f"wrote {json_path} and {csv_path}")
    return 0


def _labelled(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        label, _, path = item.partition("=")
        if not path:
            label, path = Path(item).parent.name or item, item
        out[label] = path
    return out


def cmd_plot(args) -> int:
    from oapl.evaluation.plots import plot_passk, plot_training

    runs = _labelled(args.runs)
    if args.kind == "passk":
        _require(runs, "Pass@k report (the .json `oapl eval --out` writes)", "plot passk")
        path = plot_passk(runs, args.out, benchmark=args.benchmark)
    else:
        _require(runs, "run directory or metrics.jsonl", "plot training")
        runs = {k: (str(Path(v) / "metrics.jsonl") if Path(v).is_dir() else v) for k, v in runs.items()}
        _require(runs, "metrics.jsonl (the run has not logged a step yet?)", "plot training")
        keys = tuple(args.keys.split(",")) if args.keys else ("reward_mean", "entropy", "kl", "lag", "eval/pass@1")
        path = plot_training(runs, args.out, keys=keys, x=args.x)
    print(f"wrote {path}")
    return 0


def cmd_two_stage(args) -> int:
    from oapl.recipes.two_stage import run_two_stage

    cfg = _cfg(args)
    from oapl.preflight import check_config

    check_config(cfg)  # a wrong model/dataset name fails now, naming its field
    report = run_two_stage(
        cfg, stage2_prompts=args.stage2_prompts, stage2_epochs=args.stage2_epochs, evaluate_base=not args.skip_base_eval
    )
    for label, r in report["eval"].items():
        print(f"{label:>16}: pass@1 {r['pass@1']:.4f}  ({r['model']})")
    best = report["best"]
    print(
        f"best: {best['label']} pass@1 {best['pass@1']:.4f}, chosen among the stage-2 checkpoints on "
        f"{best['selected_on']}"
        + (" (the reported split: optimistic)" if best["selected_on_test_split"] else "")
        + f"; report: {cfg.output_dir}/report.json"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample n scored responses per prompt into a rollout dataset (resumable)")
    add_config_args(p, "YAML config (the same file `oapl train` takes)")
    p.add_argument("--out", required=True, help="output directory (Parquet shards; rerun to resume)")
    p.add_argument("--split", choices=["train", "eval"], default="train", help="which prompts")
    p.add_argument("--n", type=int, default=None, help="responses per prompt (default rollout.group_size)")
    p.add_argument("--model", default=None, help="model to sample from (Hub name, path, checkpoint/model)")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--subset", type=int, default=None, help="a seeded random subset of this many prompts")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--benchmark", default=None, help="benchmark label stored with each row")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval", help="Pass@k (unbiased estimator) of rollout datasets, or of a model on the held-out split"
    )
    add_config_args(p, "YAML config (the same file `oapl train` takes)")
    p.add_argument("--rollouts", nargs="*", help="rollout datasets to score (else: generate on the held-out split)")
    p.add_argument("--out", required=True, help="report prefix: writes PREFIX.json and PREFIX.csv")
    p.add_argument("--model", default=None, help="model to evaluate when generating")
    p.add_argument("--n", type=int, default=None, help="samples per prompt when generating (default eval.n)")
    p.add_argument("--ks", default=None, help="comma-separated k values (default 1,2,4,...,n)")
    p.add_argument("--threshold", type=float, default=0.5, help="reward counted as correct")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--benchmark", default=None, help="label for the held-out split's rows")
    p.add_argument(
        "--benchmarks",
        default=None,
        help="comma-separated named benchmarks to generate on: aime25, hmmt25_feb, hmmt25_nov, brumo25, deepscaler",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="Pass@k curves or training curves as PNG")
    p.add_argument("kind", choices=["passk", "training"])
    p.add_argument(
        "runs",
        nargs="+",
        help="LABEL=PATH items: eval JSON reports (passk) or run dirs / metrics.jsonl files (training)",
    )
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--benchmark", default=None, help="passk: one benchmark, 'overall' or 'mean'")
    p.add_argument("--keys", default=None, help="training: comma-separated metric keys")
    p.add_argument("--x", default="step", choices=["step", "samples_seen"], help="training: x axis")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("two-stage", help="the paper's offline two-stage recipe, end to end")
    add_config_args(p, "YAML config (the same file `oapl train` takes)")
    p.add_argument("--stage2-prompts", type=int, default=4000, help="random prompts regenerated for stage 2")
    p.add_argument("--stage2-epochs", type=int, default=4)
    p.add_argument("--skip-base-eval", action="store_true")
    p.set_defaults(func=cmd_two_stage)
