"""Isolated execution of untrusted programs (used by the code reward).

See ``docs/rewards-code.md`` for the threat model and limits.
"""

from oapl.rewards.sandbox.runner import SandboxRunner, probe_namespaces
from oapl.rewards.sandbox.types import ProgramJob, ProgramResult, SandboxConfig, SandboxUnavailableError, TestRun

__all__ = [
    "ProgramJob",
    "ProgramResult",
    "SandboxConfig",
    "SandboxRunner",
    "SandboxUnavailableError",
    "TestRun",
    "probe_namespaces",
]
