"""oapl: off-policy RL post-training of LLMs with OAPL and a lagged inference policy."""

__version__ = "0.1.0"
