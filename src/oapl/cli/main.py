"""``oapl`` command line: train, generate, eval, plot."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from oapl.cli.args import add_config_args, fields_help, split_config
from oapl.config import TrainConfig, load_config
from oapl.config_views import is_offline
from oapl.errors import UserError, debug_enabled, user_message


def cmd_train(args) -> int:
    config, overrides = split_config(args)
    resume = args.resume
    if config == "resume":  # `oapl train resume key=value`
        config, resume = None, True
    if "resume" in overrides:  # `oapl train cfg.yaml resume`
        overrides.remove("resume")
        resume = True
    if resume and args.overwrite:
        raise UserError("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
    cfg = load_config(config, overrides)
    args.output_dir = cfg.output_dir  # for the interrupt message
    from oapl.rundir import check_run_dir

    check_run_dir(cfg.output_dir, resume=resume, overwrite=args.overwrite)  # before any slow loading
    from oapl.preflight import check_config

    check_config(cfg)
    if is_offline(cfg):
        from oapl.offline import train_offline

        summary = train_offline(cfg, resume=resume, overwrite=args.overwrite)
        print(f"offline training done: {summary['steps']} steps; checkpoints: {summary['checkpoints']}")
        return 0
    from oapl.loop import train

    result = train(cfg, resume=resume, overwrite=args.overwrite)
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
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also: "
        "OAPL_DEBUG=1); without it a mistake in the input is one line `oapl: <what>: <why>`",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train",
        help="train with OAPL (or GRPO) and a lagged inference engine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=fields_help(TrainConfig),
    )
    add_config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in output_dir (also: a bare `resume` word)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in a non-empty output_dir (its "
        "files are deleted once the new run has started); without --resume or --overwrite a "
        "non-empty output_dir is refused",
    )
    p.set_defaults(func=cmd_train)
    from oapl import check
    from oapl.cli import compare, rollouts

    rollouts.register(sub)
    compare.register(sub)
    check.register(sub)
    return parser


def _interrupted(args, exc: KeyboardInterrupt) -> str:
    """What was saved, truthfully: the checkpoint the interrupt handler wrote, or none."""
    from oapl import signals

    written = getattr(exc, "oapl_checkpoint", None) or signals.written_checkpoint()
    if written:
        return f"oapl: interrupted ({signals.signal_name(exc)}); checkpoint written: {written}; continue with --resume"
    out = getattr(args, "output_dir", None)
    latest = None
    if out:
        from oapl.trainer.checkpoint import latest_checkpoint

        try:
            latest = latest_checkpoint(out)
        except OSError:
            latest = None
    if latest is not None:
        return (
            f"oapl: interrupted ({signals.signal_name(exc)}) before a checkpoint was written; the latest "
            f"checkpoint is {latest} (--resume continues from it)"
        )
    return f"oapl: interrupted ({signals.signal_name(exc)}); no checkpoint was written"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from oapl import signals

    # first: SIGTERM (kill, timeout, docker stop, SLURM) and SIGUSR1 stop as Ctrl-C does, in every phase
    installed = signals.install()
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # before the command started (parsing the arguments, setting up logs)
        print(f"oapl: interrupted ({signals.signal_name(e)}); nothing had started", file=sys.stderr)
        return signals.exit_code(e)
    finally:
        if installed:
            signals.restore()


def _main(argv: list[str]) -> int:
    from oapl import signals

    debug = debug_enabled(argv)
    if debug:
        os.environ["OAPL_DEBUG"] = "1"  # the rollout worker's thread and engine processes see it too
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    args = parser.parse_args(argv)
    from oapl.logs import quiet_engine_logs, setup_cli_logging

    setup_cli_logging(verbose=args.verbose)  # log lines go above the progress bar, not through it
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_engine_logs(verbose=args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print(_interrupted(args, e), file=sys.stderr)
        return signals.exit_code(e)  # 128 + the signal: 130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1
    except Exception as e:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        message = user_message(e)
        if message is None:  # a write that failed for want of space, where the writer did not name the file
            from oapl.errors import disk_full_error

            full = disk_full_error(e, getattr(args, "output_dir", None) or ".")
            message = None if full is None else str(full)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"oapl: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
