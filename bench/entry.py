"""The door of the bench scripts a user runs: a bad argument, a refusal or a stop is one line, as the
commands' are (argparse printed its usage block first; a FlowARError raised past ``main`` and Ctrl-C
were tracebacks; SIGTERM ended a run without a word).

    from entry import Parser, run_script
    ap = Parser(description=...)
    ...
    sys.exit(run_script(main))
"""

from __future__ import annotations

import argparse
import signal
import sys


class Parser(argparse.ArgumentParser):
    """argparse whose refusal of an argument is one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}. Fix: see {self.prog} --help\n")


def relayed(line: str, who: str, fix: str):
    """A child command's error ``line`` as this script's one line, naming the command that said it (``who``):
    it was a CalledProcessError's traceback, or its line cut short inside another."""
    from flowar.errors import FlowARError, said_in
    if said := said_in(line):
        return FlowARError(f"{said.expected} ({who})", said.got, said.fix)
    return FlowARError(f"{who} to succeed", line.strip() or "nothing said", fix)


def run_script(main, argv: list[str] | None = None) -> int:
    """``main(argv)``; Ctrl-C and SIGTERM end it "interrupted" (exit 130), a FlowARError or an OSError is
    its one line (exit 2), and ``--debug`` among the arguments keeps the traceback."""
    from flowar.errors import FlowARError, one_line, stop_asked, stops_cleared
    argv = sys.argv[1:] if argv is None else list(argv)
    stops_cleared()
    before = {s: signal.signal(s, stop_asked) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(argv)
    except KeyboardInterrupt as e:
        print("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except (FlowARError, OSError) as e:
        if "--debug" in argv:
            raise
        print(one_line(e), file=sys.stderr)
        return 2
    finally:
        for s, h in before.items():
            signal.signal(s, h)
