"""A bulk run's workers followed (:mod:`flowar.commands.bulk`): the bar of their batches, and their
failure as one line."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from flowar.errors import FlowARError

if TYPE_CHECKING:
    from pathlib import Path

    from flowar.commands.bulk import BulkSpec

LOG_EVERY_S = 30.0            # progress lines when stderr is not a terminal


def follow_workers(consume, told, spec: BulkSpec, done_before: int, close, out: Path) -> list[dict]:
    """Run ``consume(rows)`` on this thread while a bar, on another, follows the workers' batches
    from ``told`` (images counted as each batch ends, not as each shard does); errors as one line.
    The work is on this thread so that an interrupt (Ctrl-C, or SIGTERM on Ray) stops it here, where
    Ray Data's iterator shuts its executor down before Ray is (the other way round, its threads
    printed tracebacks)."""
    from queue import Empty              # Ray's queue raises a subclass of it: the local path imports no Ray
    rows: list[dict] = []
    finished = threading.Event()

    def follow() -> None:
        import sys

        from tqdm import tqdm
        # a bar on a terminal; in a log, a line after the first batch and every LOG_EVERY_S seconds
        log, t0, said, batch, done = not sys.stderr.isatty(), time.perf_counter(), 0.0, None, 0
        with tqdm(total=spec.num_images, initial=done_before, desc="sampling", unit="img", disable=log or None,
                  smoothing=0.1) as bar:
            while not finished.is_set() or not told.empty():
                try:
                    what, n = told.get(timeout=0.5)
                except Empty:
                    continue
                except Exception:   # noqa: BLE001 - the queue's actor gone (an interrupt): nothing more to show
                    return
                if what == "batch":                 # a worker has opened its engines: the clock starts
                    t0, batch = t0 if batch else time.perf_counter(), n
                    bar.set_postfix_str(f"batch {n}", refresh=True)
                    continue
                bar.update(n)
                done, now = done + n, time.perf_counter()
                if log and (not said or now - said >= LOG_EVERY_S or done_before + done == spec.num_images):
                    rate, said = done / (now - t0), now
                    left = (spec.num_images - done_before - done) / rate
                    print(f"sampling: {done_before + done}/{spec.num_images} images, {rate:.3g} images/s at batch "
                          f"{batch}, {left / 60:.1f} min left", file=sys.stderr, flush=True)
    follower = threading.Thread(target=follow, daemon=True) if told is not None else None
    if follower is not None:
        follower.start()
    failed = None
    try:
        consume(rows)
    except Exception as e:   # noqa: BLE001 - a worker's failure: one line below (an interrupt passes)
        failed = e
    finally:
        finished.set()
        if follower is not None:
            follower.join(5)
    close()
    if failed is not None:
        cause = next((c for c in causes(failed) if isinstance(c, FlowARError)), None)
        if cause is not None:
            raise cause from None
        import errno
        full = next((c for c in causes(failed) if isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT)), None)
        if full is not None or "No space left on device" in str(failed):   # (it blamed the workers and the engines)
            raise FlowARError("room on the disk for the run's shards and images",
                              f"{getattr(full, 'filename', None) or out}: no space left on device",
                              "free some space (the shards written are kept), then run the same command again: it "
                              "resumes") from None
        last = next((ln.strip() for ln in reversed(str(failed).splitlines()) if ln.strip()), type(failed).__name__)
        raise FlowARError("workers that sample their shards", last[:300], "run the same command again "
                          "to resume; flowar-run --engine-dir DIR --labels 0 shows whether the engines open") from None
    return rows


def causes(e: BaseException | None):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__ or getattr(e, "cause", None)
