"""Regenerate the field table of docs/configuration.md from the typed config (python scripts/gen_config_docs.py)."""

from __future__ import annotations

from pathlib import Path

from oapl.config import describe_fields

TABLE_HEAD = """## Fields

| field | default | meaning |
|---|---|---|
"""


def main() -> None:
    """Rewrite the field table; the hand-written part of the page above ``## Fields`` stays as it is."""
    path = Path(__file__).resolve().parents[1].joinpath("docs", "configuration.md")
    prose = path.read_text().split(TABLE_HEAD.splitlines()[0] + "\n", 1)[0]
    rows = [f"| `{name}` | `{default}` | {desc.replace('|', '/')} |" for name, default, desc in describe_fields()]
    path.write_text(prose + TABLE_HEAD + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
