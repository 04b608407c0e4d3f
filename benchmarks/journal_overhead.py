"""Journal overhead: 20,000 no-op tasks with and without ``journal=`` on one local cluster.

Starts a local cluster of 8 engines (private IPYTHONDIR, stopped in ``finally``),
runs the same ``dynamic_map`` alternately without and with a fresh journal
(``--repeats`` times each, after a warm-up), and prints a Markdown table of
tasks/s (median and best) and the ratio on stdout. A last row times a rerun
over the complete journal (every task a stored hit).

    python benchmarks/journal_overhead.py [--tasks 20000] [--engines 8] [--repeats 60]

Target: the journal costs <= 10% throughput (ratio >= 0.90).
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def noop(x):
    return x


def sleeper(x, _s=0.001):
    import time

    time.sleep(_s)
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--task-ms", type=float, default=0.0,
                    help="tasks sleep this long instead of doing nothing (shows the overhead for real tasks)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ipmtc-bench-journal-"))
    os.environ["IPYTHONDIR"] = str(tmp / "ipython")
    import ipmtc
    from ipmtc.maps import dynamic_map

    profile = f"bench-journal-{os.getpid()}"
    info = ipmtc.start(engines=args.engines, profile=profile, flags={"launcher": "local"})
    try:
        rc = ipmtc.connect(profile)
        rc.wait_for_engines(args.engines, timeout=60)
        items = list(range(args.tasks))
        fn = noop
        if args.task_ms:
            fn = functools.partial(sleeper, _s=args.task_ms / 1000)

        cpu: dict[str, list[float]] = {"plain": [], "journal": []}

        def once(journal, which=None):
            # every run starts from the same heap: a full collection inside a run (20-30 ms here, triggered
            # by the objects earlier runs made) would otherwise land on every other run, whichever it is
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            res = dynamic_map(fn, items, client=rc, progress=False, journal=journal)
            dt = time.perf_counter() - t0
            if which:
                cpu[which].append(time.process_time() - c0)  # the driver's CPU, all its threads
            assert len(res) == args.tasks and not res.failed, res
            return dt, res

        once(None)  # warm-up: engines import, caches
        once(str(tmp / "warm.db"))
        plain, journaled = [], []
        for r in range(args.repeats):
            # alternate which goes first (ABBA): successive maps on one client slow down a little, and the
            # drift must not count against either
            order = ("plain", "journal") if r % 2 == 0 else ("journal", "plain")
            for which in order:
                if which == "plain":
                    plain.append(once(None, which)[0])
                else:
                    journaled.append(once(str(tmp / f"run{r}.db"), which)[0])
        rerun_dt, rerun = once(str(tmp / "run0.db"))
        assert rerun.journal_hits == args.tasks
        rc.close()
    finally:
        ipmtc.stop(profile)

    def rate(ts):
        return args.tasks / statistics.median(ts), args.tasks / min(ts)

    p_med, p_best = rate(plain)
    j_med, j_best = rate(journaled)
    what = f"{args.task_ms:g} ms tasks" if args.task_ms else "no-op tasks"
    print(f"### Journal overhead: {args.tasks:,} {what}, dynamic_map, {args.engines} local engines\n")
    print(f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.repeats} repeats each in ABBA order, after a warm-up; medians of the per-run times\n")
    p_cpu, j_cpu = statistics.median(cpu["plain"]), statistics.median(cpu["journal"])
    print("| run | tasks/s (median) | tasks/s (best) | seconds (median) | driver CPU s (median) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| no journal | {p_med:,.0f} | {p_best:,.0f} | {statistics.median(plain):.3f} | {p_cpu:.3f} |")
    print(f"| journal (new SQLite file) | {j_med:,.0f} | {j_best:,.0f} | {statistics.median(journaled):.3f} | "
          f"{j_cpu:.3f} |")
    print(f"| rerun: all {args.tasks:,} from the journal | {args.tasks / rerun_dt:,.0f} | - | {rerun_dt:.3f} | - |")
    ratio_med, ratio_best = j_med / p_med, j_best / p_best
    # each repeat's two runs were back to back: the median of their ratios cancels the drift and the load
    # that other processes put on a small machine, which the medians of each side alone do not
    paired = statistics.median(p / j for p, j in zip(plain, journaled))
    print(f"\n**ratio journal / no journal: {paired:.3f} (median of the {args.repeats} back-to-back pairs)**; "
          f"{ratio_med:.3f} (medians), {ratio_best:.3f} (best) "
          f"-> journal costs {100 * (1 - paired):.1f}% throughput (target <= 10%)")
    print(f"\njournal CPU in the driver: {1e6 * (j_cpu - p_cpu) / args.tasks:.1f} us per task "
          f"(the driver's own cost without it: {1e6 * p_cpu / args.tasks:.1f} us per task)")
    print(f"\nper-run seconds: no journal {[round(t, 3) for t in plain]}, "
          f"journal {[round(t, 3) for t in journaled]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
