"""What every command shares: one-line user errors, the sampling-schedule options, the entry point."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import click

from flowar.config import SAMPLING_DEFAULTS
from flowar.errors import FlowARError, one_line, raise_if_stopped, stop_asked, stopped, stops_cleared, stops_held, stops_over

EXIT_USER_ERROR = 2
SIZE_OPTIONS = ("--size", "--height", "--width", "--resolution", "--image-size", "--img-size")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Command(click.Command):
    """A command of this project. Run as a console script, under click's test runner or called, it
    sets the hub's offline switch before anything imports it, and a user error is one line and
    exit status 2: its own (FlowARError, and an OSError the checks before the work could not
    foresee) and click's usage errors (an unknown option, a folder where a file belongs), where
    click would print its usage and a hint around them. ``--debug`` shows the traceback instead."""

    def __init__(self, *args, imports_torch: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.imports_torch = imports_torch          # its work needs PyTorch (flowar-serve's process does not)

    def invoke(self, ctx):
        # Ctrl-C or an early end of input while the command works: handed to main() as it came, not
        # as click's Abort (click prints an empty line before raising that, above our one line)
        try:
            # OpenMP's thread count, checked before PyTorch loads GNU OpenMP (here, or in a served replica's or a
            # Ray worker's process): a value it cannot read (abc, 0, 1.5) was its own line "libgomp: Invalid value
            # ..." above the command's output, then ignored. An empty one (export OMP_NUM_THREADS=) is unset.
            omp = os.environ.get("OMP_NUM_THREADS")
            if omp is not None and not omp.strip():
                del os.environ["OMP_NUM_THREADS"]
            elif omp is not None and not all(p.strip().isascii() and p.strip().isdigit() and int(p) > 0
                                             for p in omp.split(",")):
                raise FlowARError("OMP_NUM_THREADS a positive integer (or a list of them), or unset", repr(omp),
                                  "unset it (unset OMP_NUM_THREADS): each command's threads are its --threads")
            if self.imports_torch:
                # PyTorch runs Python code from C++ while it imports: a stop raised in there ended the process
                # with "terminate called after throwing an instance of 'pybind11::error_already_set'" and a
                # trace (SIGABRT, exit -6; seen once in ~400 stops sent to commands as they started). It is
                # imported first, whole, and a stop that came meanwhile raised after (not under --help).
                with stops_held():
                    import torch  # noqa: F401
            return super().invoke(ctx)
        except (KeyboardInterrupt, EOFError) as e:
            raise _Stopped(e) from None

    def leftovers(self, args: list[str]) -> list[str]:
        """The values ``args`` gives without an option name, as click's own parser leaves them ([] where it cannot say)."""
        try:
            return list(self.make_parser(click.Context(self, info_name=self.name, resilient_parsing=True))
                        .parse_args(args=list(args))[1])
        except Exception:  # noqa: BLE001 - (only the message's detail depends on it)
            return []

    def main(self, args=None, prog_name=None, **extra):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        leave = _leave if args is None else sys.exit      # a program (console script), or called with arguments
        args = sys.argv[1:] if args is None else list(args)
        extra.pop("standalone_mode", None)
        # SIGTERM (kill, timeout, systemd, Kubernetes) stops a command as Ctrl-C does: its work unwinds, its
        # temporary files go, it says "interrupted", exit 130 (it ended at once, exit -15, leaving them);
        # flowar-serve (it drains) and flowar-sample's Ray (it stops the cluster) set their own meanwhile.
        # Both are recorded as they come (stop_asked), so that one a library catches still ends the command.
        stops_cleared()
        _SINCE[0] = time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else 0.0
        # a program's whole command began with its process (Python starting, imports); one called began here
        STARTED[0] = time.perf_counter() - (max(0.0, _SINCE[0] - _started_at(os.getpid())) if args is None else 0.0)
        replaced = {}                                     # the handlers replaced (only the main thread may)
        if threading.current_thread() is threading.main_thread():
            for sig, default in ((signal.SIGTERM, (signal.SIG_DFL, None)), (signal.SIGINT, (signal.default_int_handler,))):
                if signal.getsignal(sig) in default:
                    replaced[sig] = signal.signal(sig, _stop)
        unraisable = sys.unraisablehook
        if replaced:
            sys.unraisablehook = _stop_in_a_finalizer
        try:
            try:
                code = super().main(args, prog_name or self.name, standalone_mode=False, **extra)
                raise_if_stopped()                        # (a stop a library swallowed, the work then done)
            except click.BadParameter as e:               # an option's value of the wrong kind: the one-line form
                bad, left = _bad_value(e, self.name), self.leftovers(args)
                if isinstance(e, click.MissingParameter) and left and e.param is not None:
                    # ("flowar-check DIR": a value without its option name, said as "got nothing (it is required)")
                    name = e.param.opts[0]
                    bad = FlowARError(bad.expected, f"nothing; {' '.join(map(shlex.quote, left))} came without an "
                                      "option name", f"give it as {name} {shlex.quote(left[0])}" if _fits(name, left)
                                      else bad.fix)
                click.echo(one_line(bad), err=True)
                leave(EXIT_USER_ERROR)
            except click.UsageError as e:
                if isinstance(e, click.NoSuchOption) and e.option_name in SIZE_OPTIONS:   # (it said "Did you mean --seed")
                    click.echo(f"error: expected no {e.option_name}: a FlowAR model makes images of one size (FlowAR-S/L/H: "
                               f"256 px; flowar-check --engine-dir DIR says a directory's); got {e.option_name}. Fix: leave it out",
                               err=True)
                    leave(EXIT_USER_ERROR)
                msg, left = e.format_message(), self.leftovers(args)
                if msg.startswith("Got unexpected extra argument") and left:     # (click's own line form before)
                    name = next((n for n in ("--engine-dir", "--ckpt") if _fits(n, left)
                                 and any(n in q.opts for q in self.params if isinstance(q, click.Option))), None)
                    click.echo(f"error: expected options, each value after its name; got {' '.join(map(shlex.quote, left))}"
                               " without one. Fix: " + (f"give it as {name} {shlex.quote(left[0])}" if name else
                                                        "put its option's name before it") + f" (see {self.name} --help)",
                               err=True)
                    leave(EXIT_USER_ERROR)
                click.echo(f"error: {msg}{'' if msg.endswith(('.', '?')) else '.'} Fix: see {self.name} --help", err=True)
                leave(EXIT_USER_ERROR)
            except click.ClickException as e:
                e.show()
                leave(e.exit_code)
            except (click.Abort, KeyboardInterrupt, _Stopped) as e:
                _end_bars()
                cause = (e.cause if isinstance(e, _Stopped) else
                         e.__context__ if isinstance(e, click.Abort) and e.__context__ else e)
                if isinstance(cause, EOFError):             # click's Abort also stands for a file that ended early
                    if self.debugging(args):
                        raise cause from None
                    click.echo(one_line(FlowARError("complete input files", f"EOFError: {cause}",
                                                    "check the files given: one may be truncated")), err=True)
                    leave(EXIT_USER_ERROR)
                click.echo("interrupted" + (f": {cause}" if str(cause) else ""), err=True)
                leave(130)
            except Exception as e:
                _end_bars()
                if stopped() is not None and not self.debugging(args):
                    # what a library made of a stop it caught (an AttributeError of a half-imported module):
                    # the command was interrupted, and says so
                    click.echo("interrupted" + (f": {stopped()}" if stopped() else ""), err=True)
                    leave(130)
                if isinstance(e, RuntimeError) and "can't start new thread" in str(e):   # (a traceback, where the
                    e = FlowARError("room for new threads", f"none ({e}: this user's or the machine's limit reached)",
                                    "end other processes (or ask for fewer --threads)")   # machine ran out of them)
                if not isinstance(e, (FlowARError, OSError)) or self.debugging(args):
                    raise
                click.echo(one_line(e), err=True)
                leave(EXIT_USER_ERROR)
            leave(code if isinstance(code, int) else 0)
        finally:
            for sig, handler in replaced.items():
                signal.signal(sig, handler)
            sys.unraisablehook = unraisable
            stops_cleared()     # (its stop was said: the program that called it went on, and its next write raised it)

    def debugging(self, args: list[str]) -> bool:
        """Whether ``--debug`` was given (the parsed flag: ``--labels --debug`` gives labels a value)."""
        try:
            return bool(self.make_context(self.name, list(args), resilient_parsing=True).params.get("debug"))
        except Exception:   # noqa: BLE001 - arguments that do not parse: no flag
            return False


def _end_bars() -> None:
    """Close the progress bars a failed or stopped command left drawn, before its last line: that
    line went on after the bar's, on one terminal line ("| 2/4 [00:01<00:01]error: expected ...")."""
    std = sys.modules.get("tqdm.std")             # (no tqdm imported: no bar)
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()                               # (leave=False: its line erased; leave=True: kept, a newline after)


def _stop(signum, frame) -> None:
    """A command's handler of SIGINT and SIGTERM: the processes it started for its work end with it,
    then the stop is recorded and raised (:func:`~flowar.errors.stop_asked`). A SIGTERM sent to the
    command alone reached only it: a compiler that AOTInductor ran (``flowar-export --precision
    auto``) went on after the command had said "interrupted", as Python's ``subprocess.run`` kills
    only the process it started (g++), not the one that does the work (cc1plus, 5.7 s more on the tiny
    model). Each process below this one gets SIGTERM now, while they are still below it (once g++ is
    killed its cc1plus belongs to no one), except a local Ray cluster's, which block SIGTERM and are
    stopped in order by stop_ray, and those started before the command (a program that runs it in
    its own process keeps its children)."""
    from flowar.commands.cluster import _blocks_sigterm
    from flowar.io.memory import descendants
    for pid in descendants(os.getpid()):
        if not _blocks_sigterm(pid) and _started_at(pid) >= _SINCE[0] - 0.01:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:                 # (ended meanwhile, or not ours to signal)
                pass
    stop_asked(signum, frame)


_SINCE = [0.0]      # when the command began, in seconds since boot (/proc/uptime's clock; 0 where there is none)
# when the command began on time.perf_counter()'s clock, its process's start included where it is a program
# of its own (Python starting, the imports: what a person timing it sees)
STARTED = [0.0]


def _started_at(pid: int) -> float:
    """When process ``pid`` started, in seconds since boot (/proc/PID/stat; infinite where unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("inf")


def _stop_in_a_finalizer(unraisable) -> None:
    """A stop raised while a finalizer or weak-reference callback ran (PyTorch's, during a garbage
    collection) cannot leave it: Python printed "Exception ignored in: ... KeyboardInterrupt" and went
    on. It is sent again a moment later, from another thread, to be raised where the work is (a signal
    raised in this hook would be printed the same way; the stop is recorded either way: nothing is
    committed after it); anything else is Python's to print."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and stopped() is not None:
        again = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM if stopped() == "SIGTERM" else signal.SIGINT))
        again.daemon = True
        again.start()
        return
    sys.__unraisablehook__(unraisable)


def _leave(code: int) -> None:
    """End the program now with ``code``: its exit handlers run (Ray's shutdown, temporary folders,
    logging) and its output is flushed, and then the process ends without the interpreter's
    teardown, which frees every object of every module one by one: after PyTorch was imported that
    took 0.43 s of a command that had finished its work (measured on 2 cores, AMD EPYC Zen 5;
    FlowAR-S ``flowar-run --engine-dir`` 7.3 s in all). Where a thread of the program's own is
    still running (not a daemon), the ordinary exit, which waits for it."""
    import atexit
    import threading
    stops_over()                                 # (its outputs are written: a stop now changes nothing)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None or any(t.is_alive() and not t.daemon and t is not threading.main_thread()
                                        for t in threading.enumerate()):
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:               # (None where the descriptor was closed at start)
                stream.flush()
        except (OSError, ValueError):            # a closed pipe or stream: nothing more can be said on it
            pass
    os._exit(code)


def _fits(name: str, values: list[str]) -> bool:
    """Whether the one value given without its option name is what ``name`` takes: an engine directory for
    --engine-dir, a checkpoint file for --ckpt (else the fix names no option: a --data folder was told --out)."""
    try:
        p = Path(values[0])
        return len(values) == 1 and bool(values[0]) and (
            (name == "--engine-dir" and (p / "manifest.json").is_file())
            or (name == "--ckpt" and p.is_file() and p.suffix in (".pth", ".pt", ".safetensors", ".ckpt")))
    except (OSError, ValueError):           # (a name too long, a folder this user may not read)
        return False


def _bad_value(e: click.BadParameter, command: str) -> FlowARError:
    """Click's refusal of an option's value ("Invalid value for '--ckpt': File 'x' is a directory.")
    as this project's line: what the option takes, what came, the fix."""
    param, kind = e.param, e.param.type if e.param is not None else None
    name = (param.opts[0] if param is not None and getattr(param, "opts", None) else e.param_hint) or "the value"
    if isinstance(kind, click.Path):
        takes = "a file" if not kind.dir_okay else "a folder" if not kind.file_okay else "a path"
    elif isinstance(kind, click.Choice):
        takes = "one of " + ", ".join(map(str, kind.choices))
    else:
        takes = {"integer": "an integer", "float": "a number", "boolean": "true or false"}.get(
            getattr(kind, "name", ""), f"a {getattr(kind, 'name', 'valid')} value")
    got = "nothing (it is required)" if isinstance(e, click.MissingParameter) else e.message.rstrip(".")   # (was "got .")
    if not isinstance(kind, click.Path) and " is not " in got:     # ("'foo' is not one of ...": the value alone)
        got = got.split(" is not ", 1)[0]
    return FlowARError(f"{name} {takes}", got, f"give {name} {takes} (see {command} --help)")


class _Stopped(Exception):
    """A KeyboardInterrupt or EOFError raised while a command ran (``cause``)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def command(name: str, imports_torch: bool = True):
    """``@command("flowar-run")``: a :class:`Command` with the project's help options."""
    return click.command(name, cls=Command, context_settings=CONTEXT, imports_torch=imports_torch)


def schedule_options(recorded_by: str):
    """--schedule/--solver/--stride/--steps/--cfg/--guidance, each unset unless given (see flowar.sampling.schedule.Settings)."""
    def apply(f):
        opts = [
            click.option("--schedule", type=click.Choice(["official", "fast"]),
                         help=f"official: the official Euler sampler (24 steps per scale); fast: the same steps with "
                              f"the head run on 1 in 3 and the rest predicted (2.7x fewer head evaluations; images "
                              f"about 40 dB PSNR from official's) [default: official, or {recorded_by}]."),
            click.option("--solver", type=click.Choice(["euler", "ab2", "heun", "skip"]),
                         help="Override the schedule's ODE solver."),
            click.option("--stride", type=int, help="With the skip solver (--schedule fast): run the head on 1 step "
                                                    "in N, 1..64 (the schedule's: 3)."),
            click.option("--steps", type=int, help="The official sampler's num_steps N: its grid has 2 (N // 2) + 1 "
                                                   "points (25: 24 steps; 50: 50), 2..1000 [default: the schedule's, or "
                                                   f"{recorded_by}]."),
            click.option("--cfg", type=float, help=f"Guidance weight at the last scale, 1..50, 1 = off [default: "
                                                   f"{SAMPLING_DEFAULTS['cfg']}, or {recorded_by}]."),
            click.option("--guidance", type=float, help=f"Guide only at t <= this, 0..1 [default: "
                                                        f"{SAMPLING_DEFAULTS['guidance']}, or {recorded_by}]."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


def positive(*named) -> None:
    """Refuse, before any work, a count or rate that is not positive and finite (--steps 0 crashed, -5
    trained nothing, --lr inf wrote NaN weights)."""
    import math
    for name, v in named:
        if not (v > 0 and math.isfinite(v)):
            raise FlowARError(f"{name} > 0, finite", str(v), f"pass a positive {name}")


def joined(ctx, param, values: tuple) -> str | None:
    """A list option given more than once (``--labels 1 --labels 2``): one comma-separated list (the last
    alone was kept, in silence, where ``--classes`` joined them)."""
    return ",".join(values) if values else None
