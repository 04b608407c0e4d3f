"""Throughput: tasks/s for no-op and 10 ms tasks over 8 workers, ipmtc vs raw ipyparallel vs pools.

Configurations (same machine, same run, medians of --repeats after a warm-up):

* ipmtc ``dynamic_map`` and ``static_map`` (chunksize "auto") on an ipmtc cluster;
* raw ``lview.map(chunksize=1)`` and ``dview.map`` on a raw ipyparallel cluster
  (``ipp.Cluster(n=8)``, ipyparallel's defaults); raw lview.map runs fewer tasks
  (--raw-tasks) because it is ~100x slower, its rate is per task all the same;
* ``concurrent.futures.ProcessPoolExecutor(8)`` (map, chunksize=1);
* ``mpi4py.futures`` (``mpiexec -n 9``: one master, 8 workers; map, chunksize=1).

10 ms tasks are ``time.sleep(0.01)``: the ceiling is workers / 0.01 s.

    python benchmarks/throughput.py [--smoke] [--out DIR] [--tasks 20000] [--engines 8]

Issue 3 target: dynamic_map >= 100x raw lview.map on no-op tasks.
"""
from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import noop, sleep_task  # noqa: E402

SLEEP = 0.01


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--engines", type=int, default=None)
    ap.add_argument("--tasks", type=int, default=None, help="no-op tasks (default 20,000)")
    ap.add_argument("--raw-tasks", type=int, default=None, help="no-op tasks for raw lview.map (default 2,000)")
    ap.add_argument("--sleep-tasks", type=int, default=None, help="10 ms tasks (default 4,000)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    E = args.engines or (2 if args.smoke else 8)
    N = args.tasks or (400 if args.smoke else 20_000)
    NR = args.raw_tasks or (60 if args.smoke else 2_000)
    NS = args.sleep_tasks or (100 if args.smoke else 4_000)
    NRS = min(NS, NR)
    reps = args.repeats or (1 if args.smoke else 3)
    ipd = C.private_ipython_dir("throughput")
    mach = C.machine()
    res: dict[str, dict] = {}

    def record(name, n, times, kind):
        res.setdefault(name, {})[kind] = {"tasks": n, "times_s": times, "rate": n / statistics.median(times)}
        print(f"{name} {kind}: {n / statistics.median(times):,.0f} tasks/s", file=sys.stderr, flush=True)

    try:
        from ipmtc.maps import dynamic_map, static_map

        items, sleeps = list(range(N)), [SLEEP] * NS
        with C.ipmtc_cluster(E) as (_, rc):
            for mapper in (dynamic_map, static_map):
                mapper(noop, items[:1000], client=rc, progress=False)  # warm-up
            for name, mapper in (("ipmtc dynamic_map", dynamic_map), ("ipmtc static_map", static_map)):
                record(name, N, timed(lambda m=mapper: m(noop, items, client=rc, progress=False), reps), "noop")
                record(name, NS, timed(lambda m=mapper: m(sleep_task, sleeps, client=rc, progress=False), reps),
                       "sleep")
        with C.raw_cluster(E) as (_, rc):
            lview, dview = rc.load_balanced_view(), rc[:]
            lview.map(noop, range(2 * E), chunksize=1).get()
            dview.map(noop, range(2 * E), block=True)
            record("raw lview.map (chunksize=1)", NR,
                   timed(lambda: lview.map(noop, range(NR), chunksize=1).get(), max(1, reps - 1)), "noop")
            record("raw lview.map (chunksize=1)", NRS,
                   timed(lambda: lview.map(sleep_task, [SLEEP] * NRS, chunksize=1).get(), max(1, reps - 1)),
                   "sleep")
            record("raw dview.map", N, timed(lambda: dview.map(noop, items, block=True), reps), "noop")
            record("raw dview.map", NS, timed(lambda: dview.map(sleep_task, sleeps, block=True), reps), "sleep")
        with ProcessPoolExecutor(E) as ex:
            list(ex.map(noop, range(4 * E)))
            record(f"ProcessPoolExecutor({E})", N, timed(lambda: list(ex.map(noop, items)), reps), "noop")
            record(f"ProcessPoolExecutor({E})", NS, timed(lambda: list(ex.map(sleep_task, sleeps)), reps), "sleep")
        name = f"mpi4py.futures (mpiexec -n {E + 1})"
        for kind, mpargs, n in (("noop", ["--noop", str(N)], N), ("sleep", ["--sleep", str(NS), str(SLEEP)], NS)):
            record(name, n, [C.mpi_run(E, mpargs)["elapsed_s"] for _ in range(reps)], kind)
    finally:
        C.kill_leftovers(ipd)

    raw = res["raw lview.map (chunksize=1)"]
    ceiling = E / SLEEP
    rows = []
    for name, r in res.items():
        no, sl = r.get("noop"), r.get("sleep")
        rows.append([name, f"{no['tasks']:,}", no["rate"], no["rate"] / raw["noop"]["rate"],
                     f"{sl['tasks']:,}", sl["rate"], sl["rate"] / ceiling])
    dyn = res["ipmtc dynamic_map"]["noop"]["rate"] / raw["noop"]["rate"]
    md = "\n".join([
        f"### Throughput: no-op and {SLEEP * 1000:g} ms tasks over {E} workers", "", C.machine_line(mach), "",
        f"Median of {reps} runs (raw lview.map: {max(1, reps - 1)}) after a warm-up; tasks/s = tasks / wall time "
        f"of the whole map as the caller sees it. 10 ms ceiling: {E} workers / 10 ms = {ceiling:,.0f} tasks/s.", "",
        C.md_table(["configuration", "no-op tasks", "no-op tasks/s", "x raw lview.map", "10 ms tasks",
                    "10 ms tasks/s", "10 ms share of ceiling"], rows), "",
        f"ipmtc dynamic_map / raw lview.map (no-op): **{dyn:,.0f}x** (issue 3 target >= 100x: "
        f"{'met' if dyn >= 100 else 'not met'})."])
    C.write_outputs(args.out, "throughput", md, {"machine": mach, "engines": E, "results": res})
    fig, (a1, a2) = C.new_figure(11, 4.5, ncols=2)
    names = list(res)
    short = [n.replace(" (chunksize=1)", "\n(chunksize=1)").replace(" (mpiexec", "\n(mpiexec") for n in names]
    a1.barh(short, [res[n]["noop"]["rate"] for n in names], color="#4a7ab0")
    a1.set_xscale("log")
    a1.set_xlabel("no-op tasks/s (log)")
    a2.barh(short, [res[n]["sleep"]["rate"] for n in names], color="#4a9a3a")
    a2.axvline(ceiling, color="black", linestyle=":", label="ceiling")
    a2.set_xlabel(f"{SLEEP * 1000:g} ms tasks/s")
    a2.legend()
    for ax in (a1, a2):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    a2.set_yticklabels([])
    fig.suptitle(f"Throughput over {E} workers ({mach['cores']} cores)")
    fig.tight_layout()
    fig.savefig(args.out / "throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
