"""Argument helpers shared by every `oapl` sub-command (one module, so commands never import each other)."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, help_config: str = "YAML config file (optional)") -> None:
    """``CONFIG [key=value ...]``: a YAML file and dotted overrides."""
    p.add_argument("config", nargs="?", help=help_config)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5 rollout.sync_interval=10")


def split_config(args) -> tuple[str | None, list[str]]:
    """Allow ``oapl train key=value`` with no YAML file: a first argument with ``=`` that is not a
    ``.yaml``/``.yml`` path is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def fields_help(cls, title: str = "configuration fields (YAML keys, or key=value overrides):") -> str:
    """Every field of the config class ``cls`` with its default and description (``--help`` epilog)."""
    import textwrap

    from oapl.config import describe_fields

    lines = [title]
    for name, default, desc in describe_fields(cls):
        lines.append(f"  {name} = {default}")
        for part in textwrap.wrap(desc, 90):
            lines.append(f"      {part}")
    return "\n".join(lines)
