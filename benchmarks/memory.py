"""Memory: peak RSS of the driver, the controller and the engines over 10^5 and 10^6 no-op tasks.

One local cluster of 4 engines (task DB off: the ``large`` preset's ``task_db:
none``). Each configuration runs in a fresh driver process (its peak RSS is its
own ``ru_maxrss``) that maps ``noop`` over a generator with ``ipmtc.imap``,
unordered, consuming and dropping each result -- with and without a journal.
Meanwhile this process samples the controller's and the engines' RSS (psutil,
every 0.2 s) and keeps the peaks. Raw ``lview.map`` runs beside it at 10^5
(``chunksize=100``: at one task per message it would take ~10 minutes here),
on a raw ``ipcluster`` of the same size.

Targets (issue 12): driver peak <= 150 MB at 10^6; the peak at 10^6 within 10%
of the peak at 10^5; the same with a journal; controller and engines flat.

    python benchmarks/memory.py [--smoke] [--out DIR] [--engines 4]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DRIVER = r'''
import json, resource, sys, time
kind, n, profile, journal = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.path.insert(0, sys.argv[5])
from _common import noop
import ipmtc
rc = ipmtc.connect(profile)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
count = 0
if kind == "raw":
    lview = rc.load_balanced_view()
    for _ in lview.map(noop, range(n), chunksize=100, ordered=False):
        count += 1
else:
    for _ in ipmtc.imap(noop, (i for i in range(n)), client=rc, ordered=False, progress=False,
                        journal=journal if journal != "-" else None):
        count += 1
took = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc.close()
print(json.dumps({"tasks": count, "seconds": took, "peak_rss_mb": peak / 1024, "start_rss_mb": base / 1024}))
'''


class Sampler:
    """Peak RSS of the given processes (and their children), sampled every 0.2 s in a thread."""

    def __init__(self, pids: dict[str, list[int]]):
        import psutil

        self.procs = {k: [psutil.Process(p) for p in v] for k, v in pids.items()}
        self.peak = {k: 0.0 for k in pids}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, procs in self.procs.items():
                total = 0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        total = max(total, rss) if k == "engine (max)" else total + rss
                    except Exception:
                        pass
                self.peak[k] = max(self.peak[k], total / 2**20)
            self._stop.wait(0.2)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def drive(kind: str, n: int, profile: str, journal: str, timeout_s: float) -> dict:
    cp = subprocess.run([C.PY, "-c", DRIVER, kind, str(n), profile, journal, str(C.HERE)], capture_output=True,
                        text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise RuntimeError(f"driver ({kind}, {n}) exited with {cp.returncode}: {cp.stderr.strip()[-800:]}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--engines", type=int, default=4)
    args = ap.parse_args(argv)
    sizes = [10_000, 20_000] if args.smoke else [100_000, 1_000_000]
    raw_n = 2_000 if args.smoke else 100_000
    ipd = C.private_ipython_dir("memory")
    mach = C.machine()
    rows, data = [], {"machine": mach, "engines": args.engines, "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="ipmtc-bench-memory-"))
    try:
        with C.ipmtc_cluster(args.engines, task_db="none") as (info, rc):
            engines = [e["pid"] for e in info.engines.values()]
            pids = {"controller": [info.controller_pid], "engine (max)": engines}
            drive("ipmtc", 1000, info.profile, "-", 120)  # warm-up (imports on the engines)
            for journal in (False, True):
                for n in sizes:
                    jpath = str(tmp / f"j-{n}.db") if journal else "-"
                    with Sampler(pids) as s:
                        r = drive("ipmtc", n, info.profile, jpath, 1800)
                    run = {"kind": "ipmtc.imap" + (" + journal" if journal else ""), "n": n, **r,
                           "controller_mb": s.peak["controller"], "engine_mb": s.peak["engine (max)"]}
                    data["runs"].append(run)
        with C.raw_cluster(args.engines) as (cluster, rc):
            ctl = [cluster.controller.pid]
            engines = list(C.engine_pids(rc).values())
            with Sampler({"controller": ctl, "engine (max)": engines}) as s:
                r = drive_raw(cluster, raw_n)
            data["runs"].append({"kind": "raw lview.map (chunksize=100)", "n": raw_n, **r,
                                 "controller_mb": s.peak["controller"],
                                 "engine_mb": s.peak["engine (max)"]})
    finally:
        C.kill_leftovers(ipd)
    by = {(r["kind"], r["n"]): r for r in data["runs"]}
    for r in data["runs"]:
        rows.append([r["kind"], f"{r['n']:,}", r["tasks"] / r["seconds"], r["start_rss_mb"], r["peak_rss_mb"],
                     r["controller_mb"], r["engine_mb"]])
    growth = []
    for kind in ("ipmtc.imap", "ipmtc.imap + journal"):
        a, b = by.get((kind, sizes[0])), by.get((kind, sizes[1]))
        if a and b:
            growth.append(f"{kind}: driver peak at {sizes[1]:,} / at {sizes[0]:,} = "
                          f"{b['peak_rss_mb'] / a['peak_rss_mb']:.3f}")
    data["growth"] = growth
    md = "\n".join([
        f"### Memory: peak RSS over {sizes[0]:,} and {sizes[1]:,} no-op tasks ({args.engines} engines, no task DB)", "",
        C.machine_line(mach), "",
        "Each row is a fresh driver process mapping over a generator, unordered, dropping each result; peaks of "
        "the driver (`ru_maxrss`), the controller and the largest engine (sampled every 0.2 s).", "",
        C.md_table(["driver", "tasks", "tasks/s", "driver at start (MB)", "driver peak (MB)",
                    "controller peak (MB)", "engine peak (MB)"], rows), "",
        *[f"- {g}" for g in growth]])
    C.write_outputs(args.out, "memory", md, data)
    return 0


def drive_raw(cluster, n: int) -> dict:
    """The raw driver connects to the raw cluster by its profile directory."""
    code = DRIVER.replace("import ipmtc\nrc = ipmtc.connect(profile)",
                          "import ipyparallel as ipp\nrc = ipp.Client(profile_dir=profile, "
                          "cluster_id=sys.argv[6])")
    cp = subprocess.run([C.PY, "-c", code, "raw", str(n), str(cluster.profile_dir), "-", str(C.HERE),
                         cluster.cluster_id],
                        capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise RuntimeError(f"raw driver exited with {cp.returncode}: {cp.stderr.strip()[-800:]}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
