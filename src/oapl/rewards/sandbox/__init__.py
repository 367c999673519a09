"""Isolated execution of untrusted programs (used by the code reward).

See ``docs/rewards-code.md`` for the threat model and limits.
"""

from oapl.rewards.sandbox.runner import (
    ProgramJob,
    ProgramResult,
    SandboxConfig,
    SandboxRunner,
    SandboxUnavailableError,
    TestRun,
    probe_namespaces,
)

__all__ = [
    "ProgramJob",
    "ProgramResult",
    "SandboxConfig",
    "SandboxRunner",
    "SandboxUnavailableError",
    "TestRun",
    "probe_namespaces",
]
