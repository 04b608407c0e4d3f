"""What security costs: CurveZMQ (``security: curve``) against HMAC signing only (``security: hmac``).

Both on the same local cluster size in the same run, alternating: start-up (``ipmtc.start`` to every
engine registered), no-op throughput (``dynamic_map``, and raw ``lview.map`` over the same cluster),
and the makespan of 10 ms tasks against the zero-overhead ceiling (tasks x 10 ms / engines).

    python benchmarks/security.py [--engines 8] [--tasks 20000] [--repeats 4] [--maps 10]

Targets: curve costs <= 10% of no-op throughput, nothing measurable with tasks of >= 10 ms.
"""
from __future__ import annotations

import gc
import statistics
import time

from _common import (
    ipmtc_cluster,
    kill_leftovers,
    machine,
    machine_line,
    md_table,
    noop,
    parser,
    private_ipython_dir,
    sleep_task,
    write_outputs,
)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--engines", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=4, help="clusters of each kind")
    ap.add_argument("--maps", type=int, default=10, help="timed no-op maps on each cluster")
    args = ap.parse_args(argv)
    if args.smoke:
        args.engines, args.tasks, args.repeats, args.maps = 2, 500, 1, 1
    import ipmtc

    ipd = private_ipython_dir("security")
    m = machine()
    modes = ("hmac", "curve")
    start_s: dict[str, list[float]] = {k: [] for k in modes}
    noop_s: dict[str, list[float]] = {k: [] for k in modes}
    raw_s: dict[str, list[float]] = {k: [] for k in modes}
    short_s: dict[str, list[float]] = {k: [] for k in modes}
    n_short = 40 * args.engines
    try:
        for r in range(args.repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate which goes first
                t0 = time.perf_counter()
                with ipmtc_cluster(args.engines, controller_ip="127.0.0.1", security=mode) as (info, rc):
                    start_s[mode].append(time.perf_counter() - t0)
                    items = list(range(args.tasks))
                    for _ in range(2):  # warm-up: imports, the channel's listeners (and their handshakes)
                        ipmtc.dynamic_map(noop, items, client=rc, progress=False)
                    for _ in range(args.maps):
                        gc.collect()  # each map from the same heap (a full collection costs 20-30 ms here)
                        t = time.perf_counter()
                        res = ipmtc.dynamic_map(noop, items, client=rc, progress=False)
                        noop_s[mode].append(time.perf_counter() - t)
                        assert len(res) == args.tasks and not res.failed
                    lview = rc.load_balanced_view()
                    n_raw = min(args.tasks, 2000)
                    t = time.perf_counter()
                    lview.map(noop, range(n_raw), chunksize=1).get()
                    raw_s[mode].append((time.perf_counter() - t) * args.tasks / n_raw)
                    t = time.perf_counter()
                    ipmtc.dynamic_map(sleep_task, [0.01] * n_short, client=rc, progress=False)
                    short_s[mode].append(time.perf_counter() - t)
    finally:
        kill_leftovers(ipd)

    def med(d, k):
        return statistics.median(d[k])

    ceiling = n_short * 0.01 / args.engines
    rows = [
        ["start-up (s)", med(start_s, "hmac"), med(start_s, "curve"), med(start_s, "curve") / med(start_s, "hmac")],
        ["dynamic_map no-op tasks/s", args.tasks / med(noop_s, "hmac"), args.tasks / med(noop_s, "curve"),
         med(noop_s, "hmac") / med(noop_s, "curve")],
        ["raw lview.map no-op tasks/s", args.tasks / med(raw_s, "hmac"), args.tasks / med(raw_s, "curve"),
         med(raw_s, "hmac") / med(raw_s, "curve")],
        [f"{n_short} x 10 ms tasks: efficiency vs ceiling", ceiling / med(short_s, "hmac"),
         ceiling / med(short_s, "curve"), med(short_s, "hmac") / med(short_s, "curve")],
    ]
    md = (f"### Security: CurveZMQ vs HMAC only, {args.engines} local engines (controller on loopback)\n\n"
          f"{machine_line(m)}; {args.repeats} clusters of each, alternating, {args.maps} timed no-op maps on "
          "each; medians\n\n"
          + md_table(["measure", "security: hmac", "security: curve", "curve / hmac (throughput: >= 0.90)"], rows)
          + "\n\nRatios of throughput are curve's rate over hmac's (1.0: no cost); start-up is curve's time over "
            "hmac's.\n")
    write_outputs(args.out, "security", md, {"machine": m, "start_s": start_s, "noop_s": noop_s, "raw_s": raw_s,
                                             "short_s": short_s, "tasks": args.tasks, "engines": args.engines})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
