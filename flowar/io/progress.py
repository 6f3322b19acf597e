"""Progress on long work: a tqdm bar on a terminal, else a plain line every :data:`LINE_EVERY_S`
seconds on stderr (a log, CI, ``nohup``, ``| tee``: tqdm alone says nothing there, and a judge's
2.5 minutes or a VAE's training passed in silence)."""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 30.0


class Lines:
    """What a bar's caller uses of tqdm (``update``, ``set_postfix(_str)``, ``total``, ``n``, ``close``),
    written as one line every ``every_s`` seconds: ``desc: n/total units (rate/s) postfix``; with
    ``scale`` (tqdm's ``unit_scale``) the counts in SI units: ``hashing: 4.21GB/16.0GB (1.05GB/s)``."""

    def __init__(self, total: int | None, desc: str, unit: str, every_s: float, scale: bool = False, initial: int = 0):
        self.total, self.desc, self.unit, self.every_s, self.scale = total, desc, unit, every_s, scale
        self.n = self.n0 = initial          # (tqdm's initial: work done before, a resumed run's; not in the rate)
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rate = (self.n - self.n0) / max(1e-9, now - self.t0)
            if self.scale:                  # (byte counts: 4.21GB, not 4213741824 Bs)
                from tqdm import tqdm
                n, total, per_s = (f"{tqdm.format_sizeof(v)}{self.unit}" for v in (self.n, self.total or 0, rate))
                done = n + (f"/{total}" if self.total else "") + f" ({per_s}/s"
            else:
                done = f"{self.n}{f'/{self.total}' if self.total else ''} {self.unit}s ({rate:.2f} {self.unit}/s"
            print(f"{self.desc}: {done}, {now - self.t0:.0f} s)"
                  + (f" {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str = "") -> None:
        self.postfix = s

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", **tqdm_options):
    """A tqdm bar where stderr is a terminal, in a Jupyter notebook (its widget: stderr is no
    terminal there), or where the caller named the stream (``file=``) or asked for the bar
    (``disable=False``); else :class:`Lines`; ``disable=True``: neither."""
    notebook = "ipykernel" in sys.modules
    if (tqdm_options.get("disable") is not None or "file" in tqdm_options or notebook or sys.stderr.isatty()):
        if notebook and "file" not in tqdm_options:      # (the notebook's widget ignores file=)
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, **tqdm_options)
    return Lines(total, desc, unit, LINE_EVERY_S, bool(tqdm_options.get("unit_scale")), tqdm_options.get("initial", 0))
