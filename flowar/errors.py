"""User-facing errors.

Every mistake a user can make (a wrong path, a checkpoint of another model, a value out of
range) raises a :class:`FlowARError` that says what was expected, what came, and how to fix
it. The command-line layer prints it as one line and exits non-zero; ``--debug`` shows the
traceback. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

import contextlib
import signal


class FlowARError(ValueError):
    """A user error: ``expected`` / ``got`` / ``fix`` rendered as one line. A ValueError, as
    diffusers' refusals of a call's arguments are: ``except ValueError`` around a call catches it."""

    def __init__(self, expected: str, got: str, fix: str):
        self.expected, self.got, self.fix = expected, got, fix
        super().__init__(f"expected {expected}; got {got}. Fix: {fix}")


def said_in(text: str) -> FlowARError | None:
    """The last line of ``text`` that is a FlowARError's (another process's stderr, or a report with a traceback
    around one), as that error: what a command relays of another's refusal; None where there is none."""
    import re
    for line in reversed(text.splitlines()):
        if found := re.search(r"expected (.+?); got (.+)\. Fix: (.+)$", line.strip()):
            return FlowARError(*found.groups())
    return None


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


_STOPS: list[str] = []     # the stops asked for while a command runs (Ctrl-C, SIGTERM): see stop_asked
_HELD = [0]                # inside stops_held(): a stop is recorded, and raised once the step is done
_ANSWERING = [0]           # inside stop_answered(): outputs are put in place after a stop
_SAYS: list[str] = []      # what a holder says when a stop comes (stops_held(says=...))


def stop_asked(signum, frame) -> None:
    """A command's handler of SIGINT and SIGTERM: the stop is recorded, then raised as a
    KeyboardInterrupt. Recorded, because a library may catch what it raised: Ctrl-C while PyTorch
    imported a part of itself late (``torch.onnx.export`` of an export) was caught there, and the
    export went on and replaced the engine directory with exit status 0, or failed later with an
    unrelated AttributeError. :func:`raise_if_stopped` raises it again at this project's next step
    that commits an output, and the command ends "interrupted" whatever became of the first.
    Held (:func:`stops_held`), the first stop waits for the step's end; a second one is raised at once
    (a training run's step and its grids kept a second Ctrl-C waiting too)."""
    _STOPS.append("SIGTERM" if signum == signal.SIGTERM else "")
    if not _HELD[0] or len(_STOPS) > 1:
        raise KeyboardInterrupt(_STOPS[-1])
    if _SAYS and _SAYS[-1]:
        import sys
        print(_SAYS[-1], file=sys.stderr, flush=True)


@contextlib.contextmanager
def stops_held(says: str | None = None):
    """A step that a stop must not cut in two (an engine directory swapped into place: a Ctrl-C
    between its renames said "interrupted" over the new directory and left the old one beside it):
    a stop that comes meanwhile is raised once the step is done (within a command, whose handler
    is :func:`stop_asked`); ``says``: a line printed when one comes (what happens now; by default
    that of the step this one is part of). Inside another held step (a file written within a
    training step), the stop waits for the end of that one."""
    _HELD[0] += 1
    _SAYS.append(says if says is not None else _SAYS[-1] if _SAYS else "")
    try:
        yield
    finally:
        _HELD[0] -= 1
        _SAYS.pop()
    if not _HELD[0]:
        raise_if_stopped()


def stops_cleared() -> None:
    """A new command begins (several run in one process under tests): no stop asked for yet."""
    _STOPS.clear()
    _SAYS.clear()
    _HELD[0] = _ANSWERING[0] = 0


def stops_over() -> None:
    """The command's work is over and it leaves: a stop from here on is recorded, not raised (one
    that came while the exit handlers ran printed "Exception ignored in atexit callback" and a
    KeyboardInterrupt traceback after the command's outputs were written)."""
    _HELD[0] += 1


def stopped() -> str | None:
    """The stop asked for while this command ran ("" for Ctrl-C, "SIGTERM"), or None."""
    return _STOPS[0] if _STOPS else None


def raise_if_stopped() -> None:
    """Before an output is put in place: a stop asked for, even one a library swallowed, ends the
    work here instead (nothing half done is committed)."""
    if _STOPS and not _ANSWERING[0]:
        raise KeyboardInterrupt(_STOPS[0])


@contextlib.contextmanager
def stop_answered():
    """Outputs that a stop must not cut short, put in place although one was asked for (which
    :func:`raise_if_stopped` refuses): a training run's checkpoint at the step it stopped at, and its
    scheduled ones while a stop waits for the step's end. The stop stays recorded (the command ends
    "interrupted")."""
    _ANSWERING[0] += 1
    try:
        yield
    finally:
        _ANSWERING[0] -= 1


def raise_if_set(stopping) -> None:
    """Work on another thread whose command is ending (``stopping``, a threading.Event, set): stopped at
    its next step, where the command would otherwise wait for it to finish."""
    if stopping.is_set():
        raise KeyboardInterrupt("stopped with its command")


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
