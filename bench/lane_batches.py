"""Which batch size pays when a replica's lanes compute at once: the ceiling of a served burst.

    python bench/lane_batches.py --engine-dir DIR [--sizes 1,2,4,8] [--repeat 2] [--json out.json]

In one process, on the engine directory's runtime (decode included, as a served image): one image
at a time on every core (the in-process rate, three images after one to warm), then for each size
b, two lanes (``Runtime.lane``, each on a thread of its own, as flowar-serve's replica runs them)
each computing a batch of b at the same time. Reports each size's seconds per image and its ratio
to one image at a time: the most a replica's two lanes can give a burst at that batch size, which
a served figure (bench/serve_load.py's "16 at once") is read against. The call plan recorded at
export measures batches on every core, one computation at a time; this measures them as lanes
compute them.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--sizes", default="1,2,4,8", help="batch sizes of each lane")
    ap.add_argument("--repeat", type=int, default=2, help="runs per size")
    ap.add_argument("--threads", type=int, default=None, help="cores of the runtime [default: all]")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from flowar.io.files import check_writable
    check_writable(a.json, False, "--json")
    from flowar.pipeline.pipeline import FlowARPipeline
    pipe = FlowARPipeline.from_pretrained(a.engine_dir, threads=a.threads)
    rt = pipe.runtime
    if rt.lanes < 2:
        raise SystemExit(f"expected engines that compute in lanes (compiled or PyTorch stages on a CPU); got "
                         f"{rt.detail}. Fix: export with --precision auto on a CPU")
    sched = rt.schedule()

    def images(r, n: int, seed: int) -> float:
        t0 = time.perf_counter()
        r.sample([(seed + i) % rt.config.num_classes for i in range(n)], sched, seed=[seed + i for i in range(n)])
        return time.perf_counter() - t0

    images(rt, 1, 0)
    one = sum(images(rt, 1, 10 + i) for i in range(3)) / 3
    print(f"one image at a time, every core: {one:.2f} s per image", flush=True)
    out = {"one_at_a_time_s": one, "lanes": {}}
    jobs: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()
    ready = threading.Event()

    def second_lane() -> None:
        lane = rt.lane()            # on this thread: its PyTorch thread count is the lane's share
        ready.set()
        while (job := jobs.get()) is not None:
            done.put(images(lane, *job))

    th = threading.Thread(target=second_lane, daemon=True)
    th.start()
    ready.wait()
    for b in (int(s) for s in a.sizes.split(",")):
        images(rt, b, 100)          # each shape once before it is timed
        runs = []
        for r in range(a.repeat):
            t0 = time.perf_counter()
            jobs.put((b, 1000 * b + 100 * r))
            images(rt, b, 1000 * b + 100 * r + 50)
            done.get()
            runs.append((time.perf_counter() - t0) / (2 * b))
        best = min(runs)
        out["lanes"][b] = {"s_per_image": runs, "ratio": one / best}
        print(f"two lanes, a batch of {b} each: {', '.join(f'{s:.2f}' for s in runs)} s per image, best "
              f"{one / best:.2f}x one at a time", flush=True)
    jobs.put(None)
    th.join()
    pipe.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    from flowar.errors import run_script
    run_script(main)
