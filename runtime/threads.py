"""The CPU thread policy of an opened source (:class:`Threads`): how many cores its engines compute
on, PyTorch's thread count while it samples, and the share of each lane while several sample."""

from __future__ import annotations

import contextlib
import functools
import numbers
import threading
from dataclasses import dataclass, field

import torch

from flowar.errors import FlowARError


@dataclass(frozen=True, slots=True)
class Threads:
    """The CPU thread policy of an opened source: resolved once when it is opened, applied in one
    place (:meth:`Runtime.sample`).

    ``cores``: what the engines compute on (ONNX Runtime sessions are built for it; calls with several
    rows run as row blocks, one per core). ``host``: PyTorch's thread count while sampling (``cores``
    where PyTorch computes stages, 1 where ONNX Runtime's threads compute them all). Lanes
    (:meth:`Runtime.lane`) share the count of samplings running: while several run, each stage call
    gets its share of the ``host`` threads (:meth:`share`); only the first lane (``floor`` 1) computes
    on all of them alone, a later one (``floor``: the lanes) never on more than its share (GNU OpenMP
    with more threads than cores throttles every team: FlowAR-S 12 % slower on the first lane once a
    second thread had computed on two threads).
    """
    cores: int
    host: int
    running: list = field(default_factory=functools.partial(list, (0,)), compare=False)   # [samplings running now]
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)
    floor: int = 1
    torch_computes: bool = True       # some stage computes in PyTorch (eager or compiled), not all in ONNX Runtime

    @classmethod
    def resolve(cls, threads: int | None, torch_computes: bool) -> "Threads":
        from flowar.engines.ort import cpu_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
            raise FlowARError("--threads an integer >= 1", repr(threads), "use e.g. --threads 2, or omit it to use every core")
        cores = cpu_threads(threads)              # (at most the machine's cores)
        return cls(cores, cores if torch_computes else 1, torch_computes=torch_computes)

    @contextlib.contextmanager
    def applied(self):
        before = torch.get_num_threads()      # (first: a new thread takes PyTorch's global count here)
        torch.set_num_threads(max(1, self.host // self.floor))
        with self.lock:
            self.running[0] += 1
        try:
            yield
        finally:
            with self.lock:
                self.running[0] -= 1
            torch.set_num_threads(before)

    def share(self, kind: str, fn, *args):
        """Around each stage call of a lane: this thread's share of the host threads while several
        samplings run (PyTorch's count is per thread; each lane samples on a thread of its own)."""
        n = max(1, self.host // max(self.floor, self.running[0]))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return fn(*args)
