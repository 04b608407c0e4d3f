"""Faults, the study's Fig. 6 scenario: 10% of attempts fail, 3 engines are removed halfway.

8 engines, 20 tasks per engine of U(0.27, 0.33) s (seeded). Each attempt raises
with probability 0.1 (retried, --retries 4); about halfway through (half the
fault-free makespan) 3 engines are SIGKILLed together with their nannies, as when
a node is lost. Reported: time to completion with faults vs fault-free, time
from the kill to completion, retries/resubmits/losses, whether every result
came back correct; and the timeline of the faulty ipmtc run (ipmtc.report).

The same scenario runs on raw ipyparallel (``lview.map(chunksize=1)`` with
``retries=4``, ipyparallel's defaults): a lost node is noticed there only when
its heartbeat expires (~30 s by default). ``--no-raw`` skips it.

    python benchmarks/faults.py [--smoke] [--out DIR] [--engines 8] [--kill 3] [--no-raw]
"""
from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import flaky_sleep, poisoned_sleep, sleep_task  # noqa: E402

P_FAIL = 0.10


def killer(pids: list[int], after_s: float, at: dict) -> threading.Timer:
    def kill():
        at["t"] = time.perf_counter()
        for p in pids:
            C.kill_tree(p)

    t = threading.Timer(after_s, kill)
    t.daemon = True
    return t


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--engines", type=int, default=None)
    ap.add_argument("--kill", type=int, default=None, help="engines to SIGKILL halfway (default 3)")
    ap.add_argument("--per-engine", type=int, default=None, help="tasks per engine (default 20)")
    ap.add_argument("--mean", type=float, default=None, help="mean task time (default 0.3 s)")
    ap.add_argument("--retries", type=int, default=4)
    ap.add_argument("--no-raw", action="store_true", help="skip raw ipyparallel (its recovery takes ~30 s)")
    args = ap.parse_args(argv)
    E = args.engines or (4 if args.smoke else 8)
    K = args.kill if args.kill is not None else (1 if args.smoke else 3)
    per = args.per_engine or (10 if args.smoke else 20)
    mean = args.mean or (0.05 if args.smoke else 0.3)
    no_raw = args.no_raw or args.smoke
    rng = random.Random(0)
    times = [rng.uniform(0.9 * mean, 1.1 * mean) for _ in range(per * E)]
    ipd = C.private_ipython_dir("faults")
    mach = C.machine()
    rows, data = [], {"machine": mach, "engines": E, "killed": K, "tasks": len(times), "p_fail": P_FAIL}
    try:
        from ipmtc import report
        from ipmtc.maps import dynamic_map

        with C.ipmtc_cluster(E) as (info, rc):
            dynamic_map(flaky_sleep, [(0.001, 0.0)] * 2 * E, client=rc, progress=False)  # warm-up
            t0 = time.perf_counter()
            clean = dynamic_map(flaky_sleep, [(t, 0.0) for t in times], client=rc, progress=False)
            free_s = time.perf_counter() - t0
            victims = [info.engines[str(e)]["pid"] for e in sorted(rc.ids)[-K:]] if K else []
            at: dict = {}
            timer = killer(victims, free_s / 2, at)
            t0 = time.perf_counter()
            timer.start()
            res = dynamic_map(flaky_sleep, [(t, P_FAIL) for t in times], client=rc, retries=args.retries,
                              progress=False)
            fault_s = time.perf_counter() - t0
            timer.join()
            ok = list(res) == times and res.ok
            m = report.analyze(res).metrics
            args.out.mkdir(parents=True, exist_ok=True)
            saved = res.save(args.out / "faults_run.json")  # + the cluster's start-up, for `ipmtc report`
            saved.write_text(json.dumps({**json.loads(saved.read_text()), "startup_s": info.startup_s}))
            report.plot_timeline(res, args.out / "faults.png",
                                 title=f"ipmtc dynamic_map: {len(times)} tasks, {P_FAIL:.0%} of attempts fail, "
                                       f"{K} of {E} engines killed at {free_s / 2:.1f} s")
            rows.append(["ipmtc dynamic_map", free_s, fault_s, fault_s / free_s,
                         fault_s - (at.get("t", t0) - t0), m["retries"], m["resubmits"], m["engine_losses"],
                         "yes" if ok else "NO"])
            data["ipmtc"] = {"fault_free_s": free_s, "faults_s": fault_s, "kill_at_s": at.get("t", t0) - t0,
                             "metrics": m, "clean_efficiency": report.analyze(clean).metrics["efficiency"],
                             "correct": ok}
        if not no_raw:
            with C.raw_cluster(E) as (_, rc):
                lview = rc.load_balanced_view()
                lview.map(flaky_sleep, [(0.001, 0.0)] * 2 * E, chunksize=1).get()
                t0 = time.perf_counter()
                lview.map(flaky_sleep, [(t, 0.0) for t in times], chunksize=1).get()
                free_s = time.perf_counter() - t0
                pids = C.engine_pids(rc)
                victims = [pids[e] for e in sorted(rc.ids)[-K:]] if K else []
                at = {}
                timer = killer(victims, free_s / 2, at)
                lview.set_flags(retries=args.retries)
                t0 = time.perf_counter()
                timer.start()
                ar = lview.map(flaky_sleep, [(t, P_FAIL) for t in times], chunksize=1)
                try:
                    got = ar.get(timeout=600)
                    ok = got == times
                except Exception as e:  # a task out of retries: raw has no per-task failure list
                    ok, got = False, f"{type(e).__name__}: {e}"
                fault_s = time.perf_counter() - t0
                timer.join()
                rows.append([f"raw lview.map (retries={args.retries})", free_s, fault_s, fault_s / free_s,
                             fault_s - (at.get("t", t0) - t0), "-", "-", "-", "yes" if ok else "NO"])
                data["raw"] = {"fault_free_s": free_s, "faults_s": fault_s, "kill_at_s": at.get("t", t0) - t0,
                               "correct": ok}
    finally:
        C.kill_leftovers(ipd)
    md = "\n".join([
        f"### Faults: {P_FAIL:.0%} of attempts fail, {K} of {E} engines killed (with their nannies) halfway", "",
        C.machine_line(mach), "",
        f"{len(times)} tasks of U({0.9 * mean:g}, {1.1 * mean:g}) s, retries={args.retries}; the kill comes at half "
        "the fault-free makespan. Timeline of the faulty ipmtc run: `faults.png` (from "
        "`ipmtc report faults_run.json --plot faults.png`).", "",
        C.md_table(["configuration", "fault-free (s)", "with faults (s)", "ratio", "kill -> done (s)", "retries",
                    "resubmits (free)", "engine losses", "all results correct"], rows)])
    extra_md, extra = poison_and_controller(args.smoke, no_raw)
    data.update(extra)
    C.write_outputs(args.out, "faults", md + "\n\n" + extra_md, data)
    return 0


def _settled_engines(rc, quiet_s: float = 1.5, limit_s: float = 15.0) -> int:
    """The engine count once the hub's registry stopped changing (deaths are told with a lag)."""
    deadline = time.monotonic() + limit_s
    last, since = len(rc.ids), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        if len(rc.ids) != last:
            last, since = len(rc.ids), time.monotonic()
    return last


def _raw_map(rc, fn, items, retries: int, timeout_s: float) -> tuple[float, str]:
    """(seconds to the end or to ``timeout_s``, how it ended) of a raw lview.map."""
    lview = rc.load_balanced_view()
    lview.set_flags(retries=retries)
    t0 = time.perf_counter()
    ar = lview.map(fn, items, chunksize=1)
    try:
        ar.get(timeout=timeout_s)
        how = "completed"
    except Exception as e:
        how = f"{type(e).__name__}: {str(e)[:60]}"
        if "Timeout" in type(e).__name__:
            how = f"still waiting after {timeout_s:g} s (hung)"
    return time.perf_counter() - t0, how


def poison_and_controller(smoke: bool, no_raw: bool) -> tuple[str, dict]:
    """A task that SIGKILLs its engine, and the controller SIGKILLed mid-map: ipmtc vs raw ipyparallel."""
    from ipmtc import _proc
    from ipmtc.errors import ControllerLostError
    from ipmtc.maps import dynamic_map

    E, n, t = (4, 40, 0.05) if smoke else (8, 200, 0.1)
    items = [(t, i == n // 3) for i in range(n)]
    rows, data = [], {}
    with C.ipmtc_cluster(E) as (info, rc):
        t0 = time.perf_counter()
        res = dynamic_map(poisoned_sleep, items, client=rc, crash_limit=3, progress=False)
        took = time.perf_counter() - t0
        ok = [r for i, r in enumerate(res) if i != n // 3] == [t] * (n - 1) and len(res.failed) == 1
        culprit = res.failed[0].ename if res.failed else "-"
        rows.append(["poisoned task: ipmtc dynamic_map (crash_limit=3)", took, f"{_settled_engines(rc)}/{E}",
                     f"completed; culprit failed as {culprit}", "yes" if ok else "NO"])
        data["poison_ipmtc"] = {"seconds": took, "engines_left": _settled_engines(rc), "correct": ok}
    if not no_raw:
        with C.raw_cluster(E) as (_, rc):
            took, how = _raw_map(rc, poisoned_sleep, items, retries=4, timeout_s=120)
            rows.append(["poisoned task: raw lview.map (retries=4)", took, f"{_settled_engines(rc)}/{E}", how,
                         "no results (the map raised)" if how != "completed" else "yes"])
            data["poison_raw"] = {"seconds": took, "engines_left": len(rc.ids), "ended": how}
    slow = [t * 2] * n
    for path in ("channel", "apply"):
        if path == "apply":
            os.environ["IPMTC_DRIVER_IP"] = "off"
        try:
            with C.ipmtc_cluster(E) as (info, rc):
                timer = killer(_proc.process_tree(info.controller_pid), n * t * 2 / E / 4, at := {})
                t0 = time.perf_counter()
                timer.start()
                try:
                    res = dynamic_map(sleep_task, slow, client=rc, progress=False)
                    how, got = "completed", len(res)
                except ControllerLostError as e:
                    how, got = "ControllerLostError (results in .result)", len(e.result)
                end = time.perf_counter()
                timer.join()
                rows.append([f"controller SIGKILLed: ipmtc dynamic_map ({path})", end - at.get("t", t0),
                             f"{len(rc.ids)}/{E}", how, f"{got} results kept"])
                data[f"controller_ipmtc_{path}"] = {"kill_to_end_s": end - at.get("t", t0), "ended": how,
                                                    "results": got}
        finally:
            os.environ.pop("IPMTC_DRIVER_IP", None)
    if not no_raw:
        with C.raw_cluster(E) as (cluster, rc):
            timer = killer(_proc.process_tree(cluster.controller.pid), n * t * 2 / E / 4, at := {})
            timer.start()
            took, how = _raw_map(rc, sleep_task, slow, retries=0, timeout_s=60)
            end = time.perf_counter()
            timer.join()
            kill_to_end = end - at.get("t", end - took)
            rows.append(["controller SIGKILLed: raw lview.map", kill_to_end, "-", how, "none (nothing returned)"])
            data["controller_raw"] = {"ended": how}
    md = "\n".join([
        f"### A task that kills its engine, and a lost controller ({E} engines, {n} tasks)", "",
        "Poisoned task: one input SIGKILLs the engine it runs on. Controller: the controller's process tree "
        "(hub and schedulers) SIGKILLed a quarter into the map; seconds are from the kill to the map's end.", "",
        C.md_table(["configuration", "seconds", "engines left", "how it ended", "results"], rows)])
    return md, data


if __name__ == "__main__":
    sys.exit(main())
