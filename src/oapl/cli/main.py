"""``oapl`` command line: train, generate, eval, plot."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from oapl.config import ConfigError, TrainConfig, describe_fields, load_config


def _fields_help(cls=TrainConfig) -> str:
    lines = ["configuration fields (YAML keys, or key=value overrides):"]
    for name, default, desc in describe_fields(cls):
        lines.append(f"  {name} = {default}")
        for part in textwrap.wrap(desc, 90):
            lines.append(f"      {part}")
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5 rollout.sync_interval=10")


def _split_config(args) -> tuple[str | None, list[str]]:
    """Allow ``oapl train key=value`` with no YAML file."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def cmd_train(args) -> int:
    config, overrides = _split_config(args)
    resume = args.resume
    if config == "resume":  # `oapl train resume key=value`
        config, resume = None, True
    if "resume" in overrides:  # `oapl train cfg.yaml resume`
        overrides.remove("resume")
        resume = True
    cfg = load_config(config, overrides)
    if cfg.offline.data:
        from oapl.offline import train_offline

        summary = train_offline(cfg, resume=resume)
        print(f"offline training done: {summary['steps']} steps; checkpoints: {summary['checkpoints']}")
        return 0
    from oapl.loop import train

    result = train(cfg, resume=resume)
    _print_result(result)
    return 0


def _print_result(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"oapl run: {result.output_dir} ({result.steps} steps)")
    table.add_column("held-out metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    before, after = result.eval_before or {}, result.eval_after or {}
    for key in sorted(set(before) | set(after), key=lambda k: (not k.startswith("pass@"), k)):
        if key.startswith("eval_"):
            continue
        b, a = before.get(key), after.get(key)
        change = f"{(a - b) * 100:+.1f} pts" if a is not None and b is not None else ""
        table.add_row(key, "" if b is None else f"{b:.3f}", "" if a is None else f"{a:.3f}", change)
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oapl", description="Off-policy RL post-training of LLMs with OAPL.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with OAPL (or GRPO) and a lagged inference engine",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fields_help())
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir "
                   "(also: a bare `resume` word)")
    p.set_defaults(func=cmd_train)
    from oapl.cli import compare, rollouts

    rollouts.register(sub)
    compare.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"oapl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oapl: interrupted; a checkpoint was written, continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
