"""Scale: 128 and 256 local engines on this machine -- start-up, memory, weak scaling, throughput, recovery.

For each size E, ipmtc first, then raw ipyparallel, one cluster alive at a time
(both under this benchmark's private IPYTHONDIR, local engines):

* start-up: from the call to every engine registered and answering --
  ``ipmtc.start(engines=E)`` (also checks the task scheduler with a test task) vs
  ``ipp.Cluster(n=E).start_and_connect_sync()`` + ``wait_for_engines(E)``
  (ipyparallel's defaults: one fresh Python per engine and per nanny);
* memory of the idle cluster: PSS (proportional set size: shared pages split
  between the processes sharing them) of every process under the IPYTHONDIR
  (controller, engines, nannies, forkers), per engine, and the engines' own
  USS (pages no other process shares);
* weak scaling: 10 tasks per engine of U(0.27, 0.33) s (seeded) -- ``dynamic_map``
  vs raw ``lview.map(chunksize=1)``; efficiency = (sum / E) / makespan, and the
  ceiling (the zero-overhead list schedule), as in weak_scaling.py;
* throughput: no-op tasks (50 per engine for ipmtc, 4 per engine for raw
  ``lview.map(chunksize=1)``, ~100x slower);
* recovery: 20 tasks per engine of 0.3 s; 1 s in, one engine is SIGKILLed (its
  nanny and node's forker stay): time until E engines are registered again,
  whether every result came back, and the makespan against the 6 s ideal.
  ipmtc's node forker starts the engine again; raw ipyparallel does not.
* stop: ``ipmtc.stop`` vs ``cluster.stop_cluster_sync()`` (given --stop-timeout-s,
  then every process left under the IPYTHONDIR is killed by PID).

Raw runs at the sizes of --raw-engines (default: those up to 128; at 256 it needs
~18 GB, 71 MB per engine and its nanny as measured at 128, of this machine's
24 GB) only where the memory it would need (per engine, as measured at a smaller
raw size, or 100 MB) fits in 80% of the memory available; a size left out, or
one where raw did not finish, is said in the table.

    python benchmarks/scale.py [--smoke] [--out DIR] [--engines 128 256] [--raw-engines 128 256]

Issue 15 targets: 256 engines registered in <= 15 s; dynamic_map within 3% of the
ceiling at 128 and 256; memory per idle engine reported.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import noop, sleep_task  # noqa: E402
from weak_scaling import efficiency, list_schedule, task_times  # noqa: E402

RAW_MB_GUESS = 100.0  # per engine and nanny, before a raw size was measured


def cluster_memory(ipd: Path, settle_s: float, engines: set[int]) -> dict[str, float]:
    """PSS of every process under ``ipd`` (MB), and the engines' mean USS (MB), once the cluster is idle."""
    import psutil

    time.sleep(settle_s)  # (a benchmark, not a test: let the registration traffic end)
    marker = f"IPYTHONDIR={ipd}"
    pss = 0
    engine_uss: list[int] = []
    for pid in C.processes_with_env(marker):
        try:
            p = psutil.Process(pid)
            m = p.memory_full_info()
        except psutil.Error:
            continue
        pss += m.pss
        if pid in engines:
            engine_uss.append(m.uss)
    return {"pss_mb": pss / 2**20, "engine_uss_mb": (sum(engine_uss) / len(engine_uss) / 2**20) if engine_uss else 0.0}


class Recovery:
    """Kill one engine ``after_s`` into a map; watch (with its own client) until ``n`` engines are registered."""

    def __init__(self, connect, n: int, pid: int, after_s: float, watch_s: float) -> None:
        self.n, self.pid, self.after_s, self.watch_s = n, pid, after_s, watch_s
        self.connect = connect
        self.back_s: float | None = None
        self.min_engines = n
        self.killed = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(self.watch_s + self.after_s + 30)

    def _run(self) -> None:
        time.sleep(self.after_s)
        os.kill(self.pid, signal.SIGKILL)  # first: a slow connect below must not delay the kill
        t_kill = time.perf_counter()
        self.killed = True
        try:
            rc = self.connect()
        except Exception as e:  # (said in the results: no number rather than a wrong one)
            self.error = f"{type(e).__name__}: {e}"
            return
        try:
            deadline = t_kill + self.watch_s
            seen_drop = False
            while time.perf_counter() < deadline:
                k = len(rc.ids)
                self.min_engines = min(self.min_engines, k)
                seen_drop = seen_drop or k < self.n
                if seen_drop and k >= self.n:
                    self.back_s = time.perf_counter() - t_kill
                    return
                time.sleep(0.05)
        finally:
            rc.close()


def run_ipmtc(E: int, times: list[float], reps: int, ipd: Path, settle_s: float, rec_tasks: int) -> dict[str, Any]:
    import ipmtc
    from ipmtc.maps import dynamic_map

    r: dict[str, Any] = {}
    profile = f"scale-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    info = ipmtc.start(engines=E, profile=profile, flags={"launcher": "local", "start_timeout_s": 600})
    r["start_s"] = time.perf_counter() - t0
    r["start_inside_s"] = info.startup_s
    rc = None
    try:
        r.update(cluster_memory(ipd, settle_s, {int(e["pid"]) for e in info.engines.values()}))
        rc = ipmtc.connect(profile)
        dynamic_map(noop, range(4 * E), client=rc, progress=False)  # warm-up
        r["eff"] = []
        for _ in range(reps):
            t0 = time.perf_counter()
            res = dynamic_map(sleep_task, times, client=rc, progress=False)
            r["eff"].append(efficiency(times, E, time.perf_counter() - t0))
            assert res.ok and len(res) == len(times)
        n_tp = 50 * E
        t0 = time.perf_counter()
        res = dynamic_map(noop, range(n_tp), client=rc, progress=False)
        r["tasks_per_s"] = n_tp / (time.perf_counter() - t0)
        assert res.ok
        victim = int(info.engines[max(info.engines, key=int)]["pid"])
        watch = Recovery(lambda: ipmtc.connect(profile), E, victim, 1.0, 60.0)
        watch.start()
        t0 = time.perf_counter()
        res = dynamic_map(sleep_task, [0.3] * rec_tasks, client=rc, progress=False)
        r["rec_makespan_s"] = time.perf_counter() - t0
        watch.join()
        r["rec_back_s"] = watch.back_s
        r["rec_watch"] = {"killed": watch.killed, "min_engines": watch.min_engines, "error": watch.error}
        r["rec_results_ok"] = sum(1 for x in res if x == 0.3)
        r["rec_failed"] = len(res.failed) + len(res.undone)
        r["rec_lost"] = res.engine_losses
    finally:
        if rc is not None:
            rc.close()
        t0 = time.perf_counter()
        ipmtc.stop(profile)
        r["stop_s"] = time.perf_counter() - t0
    return r


def run_raw(E: int, times: list[float], reps: int, ipd: Path, settle_s: float, rec_tasks: int,
            stop_timeout_s: float) -> dict[str, Any]:
    import ipyparallel as ipp

    r: dict[str, Any] = {}
    cluster = ipp.Cluster(n=E, profile=f"rawscale-{uuid.uuid4().hex[:6]}", log_level=40)
    rc = None
    try:
        t0 = time.perf_counter()
        cluster.start_cluster_sync()
        rc = cluster.connect_client_sync()
        rc.wait_for_engines(E, timeout=900)  # (start_and_connect gives up after 60 s)
        r["start_s"] = time.perf_counter() - t0
        r.update(cluster_memory(ipd, settle_s, set(rc[:].apply_sync(os.getpid))))
        lview = rc.load_balanced_view()
        lview.map(noop, range(2 * E), chunksize=1).get()  # warm-up
        r["eff"] = []
        for _ in range(reps):
            t0 = time.perf_counter()
            lview.map(sleep_task, times, chunksize=1).get()
            r["eff"].append(efficiency(times, E, time.perf_counter() - t0))
        n_tp = 4 * E
        t0 = time.perf_counter()
        lview.map(noop, range(n_tp), chunksize=1).get()
        r["tasks_per_s"] = n_tp / (time.perf_counter() - t0)
        victim = int(rc[max(rc.ids)].apply_sync(os.getpid))
        watch = Recovery(cluster.connect_client_sync,
                         E, victim, 1.0, 20.0)
        watch.start()
        t0 = time.perf_counter()
        ar = lview.map(sleep_task, [0.3] * rec_tasks, chunksize=1)
        try:
            ar.get()
            failed = 0
        except ipp.error.CompositeError as e:
            failed = len(e.elist)
        except Exception:
            failed = 1
        r["rec_makespan_s"] = time.perf_counter() - t0
        watch.join()
        r["rec_back_s"] = watch.back_s
        r["rec_watch"] = {"killed": watch.killed, "min_engines": watch.min_engines, "error": watch.error}
        r["rec_failed"] = failed
        r["rec_results_ok"] = rec_tasks - failed
    finally:
        if rc is not None:
            rc.close()
        t0 = time.perf_counter()
        done = threading.Event()

        def stop() -> None:
            try:
                cluster.stop_cluster_sync()
            except Exception:
                pass
            done.set()

        threading.Thread(target=stop, daemon=True).start()
        r["stop_s"] = time.perf_counter() - t0 if done.wait(stop_timeout_s) else None
        C.kill_leftovers(ipd)
    return r


def quiet(max_wait_s: float = 60.0) -> None:
    """Wait (at most ``max_wait_s``) until this machine's CPUs are mostly idle: what the last phase left exiting
    must not count against the next."""
    import psutil

    deadline = time.monotonic() + max_wait_s
    while psutil.cpu_percent(interval=1.0) > 20 and time.monotonic() < deadline:
        pass


def available_mb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**20


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--engines", type=int, nargs="+", default=None)
    ap.add_argument("--raw-engines", type=int, nargs="*", default=None,
                    help="sizes for raw (default: those of --engines up to 128)")
    ap.add_argument("--repeats", type=int, default=None, help="weak-scaling maps per size (median)")
    ap.add_argument("--stop-timeout-s", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = sorted(args.engines or ([4] if args.smoke else [128, 256]))
    # raw at 256 needs ~18 GB here (71 MB per engine and nanny, measured at 128) of this machine's 24 GB
    raw_sizes = sorted([E for E in sizes if E <= 128] if args.raw_engines is None else args.raw_engines)
    reps = args.repeats or (1 if args.smoke else 2)
    mean = 0.03 if args.smoke else 0.3
    settle_s = 0.5 if args.smoke else 3.0
    ipd = C.private_ipython_dir("scale")
    mach = C.machine()
    results: dict[str, dict[int, Any]] = {"ipmtc": {}, "raw": {}}
    skipped: dict[int, str] = {}
    t_start = time.monotonic()
    try:
        for E in sizes:  # ipmtc first at every size: a raw cluster's exit (GBs freed) must not overlap it
            quiet()
            print(f"ipmtc E={E} ...", file=sys.stderr, flush=True)
            results["ipmtc"][E] = run_ipmtc(E, task_times(E, mean, args.seed), reps, ipd, settle_s, 20 * E)
            print(f"ipmtc E={E}: {results['ipmtc'][E]}", file=sys.stderr, flush=True)
        for E in sorted(set(sizes) - set(raw_sizes)):
            skipped[E] = "raw not run at this size (--raw-engines): ~71 MB per engine and nanny here, ~18 GB at 256"
        for E in raw_sizes:
            measured = [v["pss_mb"] / n for n, v in results["raw"].items()]
            need = E * (max(measured) if measured else RAW_MB_GUESS)
            if need > 0.8 * available_mb():
                skipped[E] = (f"not run: would need ~{need / 1024:.0f} GB, {available_mb() / 1024:.0f} GB available")
                print(f"raw E={E}: {skipped[E]}", file=sys.stderr, flush=True)
                continue
            quiet()
            print(f"raw E={E} ...", file=sys.stderr, flush=True)
            try:
                results["raw"][E] = run_raw(E, task_times(E, mean, args.seed), reps, ipd, settle_s, 20 * E,
                                            args.stop_timeout_s)
                print(f"raw E={E}: {results['raw'][E]}", file=sys.stderr, flush=True)
            except Exception as e:  # said in the table: the raw baseline did not finish at this size
                skipped[E] = f"raw did not finish: {type(e).__name__}: {str(e)[:120]}"
                C.kill_leftovers(ipd)
    finally:
        C.kill_leftovers(ipd)
    ceiling = {E: efficiency(task_times(E, mean, args.seed), E, list_schedule(task_times(E, mean, args.seed), E))
               for E in sizes}
    data = {"machine": mach, "sizes": sizes, "raw_sizes": raw_sizes, "mean_s": mean, "repeats": reps,
            "results": results, "ceiling": ceiling, "skipped": skipped, "took_s": time.monotonic() - t_start}
    render(data, args.out)
    return 0


def cells(v: dict | None, key: str, per: int = 1) -> Any:
    return "-" if v is None or v.get(key) is None else v[key] / per


def render(data: dict, out: Path) -> None:
    import statistics

    sizes, mean = data["sizes"], data["mean_s"]
    res = {k: {int(E): v for E, v in d.items()} for k, d in data["results"].items()}
    ceiling = {int(E): v for E, v in data["ceiling"].items()}
    skipped = {int(E): v for E, v in data["skipped"].items()}
    rows = []
    for E in sizes:
        i = res["ipmtc"].get(E)
        w = res["raw"].get(E)
        if i is None:
            continue
        def ratio(key: str, i: dict = i, w: dict | None = w) -> Any:
            return "-" if w is None or not w.get(key) or i.get(key) is None else i[key] / w[key]

        eff_i = statistics.median(i["eff"])
        eff_w = statistics.median(w["eff"]) if w else None
        raw_note = skipped.get(E, "")
        rows += [
            [E, "registered and answering (s)", i["start_s"], cells(w, "start_s"), ratio("start_s"),
             f"ipmtc's own start-up {i['start_inside_s']:.2f} s" + ("; target <= 15 s at 256: "
                                                                     + ("met" if i["start_s"] <= 15 else "not met")
                                                                     if E == 256 else "")],
            [E, "memory of the idle cluster, PSS per engine (MB)", i["pss_mb"] / E,
             cells(w, "pss_mb", E), ratio("pss_mb"),
             f"all {i['pss_mb'] / 1024:.1f} GB"
             + (f" (raw {w['pss_mb'] / 1024:.1f} GB)" if w else "") + "; controller, nannies and forkers included"],
            [E, "engine's own memory, USS (MB)", i["engine_uss_mb"], cells(w, "engine_uss_mb"), ratio("engine_uss_mb"),
             "pages no other process shares"],
            [E, f"weak scaling efficiency (ceiling {ceiling[E]:.3f})", eff_i, "-" if eff_w is None else eff_w,
             "-" if eff_w is None else eff_i / eff_w,
             f"ipmtc {100 * (1 - eff_i / ceiling[E]):.1f}% under the ceiling (target <= 3%: "
             + ("met" if eff_i >= 0.97 * ceiling[E] else "not met") + ")"],
            [E, "throughput, no-op tasks (tasks/s)", i["tasks_per_s"], cells(w, "tasks_per_s"), ratio("tasks_per_s"),
             ""],
            [E, "recovery: one engine SIGKILLed 1 s in, back after (s)", cells(i, "rec_back_s"),
             (f"not replaced ({w.get('rec_watch', {}).get('min_engines', '?')} engines left)"
              if w and w.get("rec_back_s") is None else cells(w, "rec_back_s")), "-",
             f"ipmtc: {i['rec_results_ok']}/{20 * E} results, {i.get('rec_failed')} failed, makespan "
             f"{i['rec_makespan_s']:.2f} s (ideal 6.0)"
             + (f"; raw: {w['rec_results_ok']}/{20 * E} results, {w['rec_failed']} failed, makespan "
                f"{w['rec_makespan_s']:.2f} s" if w else "")],
            [E, "stop (s)", i["stop_s"], "did not return" if w and w.get("stop_s") is None else cells(w, "stop_s"),
             ratio("stop_s"), raw_note],
        ]
    md = "\n".join([
        f"### Scale: {', '.join(map(str, sizes))} local engines on one machine", "",
        C.machine_line(data["machine"]), "",
        f"One cluster alive at a time; ipmtc, then raw ipyparallel (`ipp.Cluster(n=E)`, its defaults) at each size. "
        f"Weak scaling: 10 tasks per engine of U({0.9 * mean:g}, {1.1 * mean:g}) s, median of {data['repeats']} "
        f"maps (ipmtc `dynamic_map`, raw `lview.map(chunksize=1)`); throughput: no-op tasks (ipmtc 50 per "
        f"engine, raw 4 per engine). Whole benchmark: {data['took_s']:.0f} s.", "",
        C.md_table(["engines", "measure", "ipmtc", "raw ipyparallel", "ratio ipmtc/raw", "note"], rows)])
    C.write_outputs(out, "scale", md, data)


if __name__ == "__main__":
    sys.exit(main())
