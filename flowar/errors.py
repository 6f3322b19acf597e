"""User-facing errors.

Every mistake a user can make (a wrong path, a checkpoint of another model, a value out of
range) raises a :class:`FlowARError` that says what was expected, what came, and how to fix
it. The command-line layer prints it as one line and exits non-zero; ``--debug`` shows the
traceback. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class FlowARError(Exception):
    """A user error: ``expected`` / ``got`` / ``fix`` rendered as one line."""

    def __init__(self, expected: str, got: str, fix: str):
        self.expected, self.got, self.fix = expected, got, fix
        super().__init__(f"expected {expected}; got {got}. Fix: {fix}")


class CheckpointError(FlowARError):
    """A checkpoint that cannot be read or does not fit the model."""


class ConfigError(FlowARError):
    """A config or preset that is unknown or inconsistent."""


def one_line(e: FlowARError | OSError) -> str:
    """What a command prints for a user error, or for a path it could not use after its checks
    (disk full, a folder removed while it ran)."""
    if isinstance(e, FlowARError):
        return f"error: {e}"
    return (f"error: expected paths this command can read and write; got {e.filename or ''}: {e.strerror or e}. "
            "Fix: check the path, its permissions and the free disk space")


class EngineDirError(FlowARError):
    """An engine directory that is missing, partial, tampered with, or built for something else."""


def run_script(main) -> None:
    """A bench script's entry: exit with ``main()``'s status, or with a user error as one line on
    stderr and status 2 (a traceback before)."""
    import sys
    try:
        code = main()
    except (FlowARError, OSError) as e:
        print(one_line(e), file=sys.stderr)
        code = 2
    sys.exit(code)
