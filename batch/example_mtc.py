#!/usr/bin/env python3
"""A small many-task job: estimate pi by Monte Carlo, one task per random seed.

Run it inside a batch job after ``ipmtc start`` (see slurm.sbatch / pbs.sh),
or on a laptop after ``ipmtc start --engines 4``. Replace ``throw_darts`` and
the list of tasks with your own work; the rest (connect, map, report, exit
status) is what a many-task script needs.

    python example_mtc.py --tasks 400 --samples 20000
    python example_mtc.py --tasks 5000 --task-seconds 1 --journal pi.db   # long: drains at the walltime

It prints the number of tasks each node ran, the estimate of pi, and the
tasks left undone when the job's time ran out. Exit status:

    0  every task done
    1  some tasks failed (their errors are printed)
    3  the allocation was ending: tasks were left undone ("drained"); with
       --journal, submit the same job again and only those run
    130  interrupted (Ctrl-C, or SIGTERM from the batch script's trap): the
       finished tasks are in the --journal, if one was given

``dynamic_map`` reads when the job ends (Slurm: squeue; PBS: qstat or
PBS_WALLTIME) and stops handing out tasks that would not finish
``--drain-margin-s`` seconds before that, estimating task times from the
tasks that finished. Keep the margin larger than the batch script's
``--signal`` lead time (plus up to 60 s, the resolution of Slurm's signal)
plus the time ``ipmtc stop`` and your saving take.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def throw_darts(task):
    """One task: ``samples`` random points in the unit square; how many fall inside the quarter circle.

    Deterministic per task (seeded by its index), so results can be checked and a
    rerun gives the same numbers. Runs on an engine: import what it needs inside.
    """
    import os
    import random
    import socket
    import time

    index, samples, sleep_s = task
    rng = random.Random(index)
    inside = 0
    for _ in range(samples):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    if sleep_s:
        time.sleep(sleep_s)  # stands in for a longer computation
    # fake Slurm nodes on one machine share a hostname: SLURMD_NODENAME tells them apart
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return index, inside, node


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=400, help="number of tasks (default 400)")
    p.add_argument("--samples", type=int, default=20_000, help="random points per task (default 20000)")
    p.add_argument("--task-seconds", type=float, default=0.0,
                   help="extra seconds each task sleeps, to mimic longer tasks (default 0)")
    p.add_argument("--drain-margin-s", type=float, default=240.0,
                   help="stop handing out tasks this long before the job ends (default 240)")
    p.add_argument("--retries", type=int, default=1, help="reruns of a task that raised (default 1)")
    p.add_argument("--journal", help="SQLite journal: finished tasks are kept and skipped on a rerun")
    p.add_argument("--out", help="write the results and summary as JSON to this file")
    p.add_argument("--profile", help="ipmtc profile (default: this job's cluster)")
    args = p.parse_args(argv)

    # A batch script runs this in the background so that its trap can run at once;
    # bash starts background jobs with SIGINT ignored: restore Ctrl-C, and treat
    # SIGTERM the same way (the finished tasks stay in the journal).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)

    import ipmtc
    from ipmtc.allocation import job_end_time

    rc = ipmtc.connect(args.profile)
    end = job_end_time()
    if end is not None:
        left = end - time.time()
        print(f"job ends at {time.strftime('%F %T', time.localtime(end))} (in {left:.0f} s); "
              f"no new task after {time.strftime('%T', time.localtime(end - args.drain_margin_s))} "
              f"(margin {args.drain_margin_s:g} s)", flush=True)
    else:
        print("job end time unknown: no draining", flush=True)
    print(f"{len(rc.ids)} engines, {args.tasks} tasks of {args.samples} samples", flush=True)

    tasks = [(i, args.samples, args.task_seconds) for i in range(args.tasks)]
    lost = False
    try:
        res = ipmtc.dynamic_map(throw_darts, tasks, client=rc, retries=args.retries,
                                drain_margin_s=args.drain_margin_s, journal=args.journal,
                                progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        print("interrupted: tasks in flight are abandoned"
              + (f"; the finished ones are recorded in {args.journal}: submit again to continue"
                 if args.journal else ""), flush=True)
        return 130
    except ipmtc.EnginesLostError as e:  # every engine gone: keep what finished
        print(f"error: {e}", flush=True)
        res, lost = e.result, True
    finally:
        rc.close()

    done = [v for v in res if not isinstance(v, ipmtc.TaskFailure)]
    per_node: dict[str, int] = {}
    for _, _, node in done:
        per_node[node] = per_node.get(node, 0) + 1
    inside = sum(v[1] for v in done)
    s = res.summary()
    print(f"tasks: {s['ok']} ok, {s['failed']} failed, {s['undone']} undone of {args.tasks}; "
          f"{s['engine_losses']} engines lost; makespan {s['makespan_s']:.1f} s on {s['engines']} engines",
          flush=True)
    print("tasks per node: " + " ".join(f"{n}={c}" for n, c in sorted(per_node.items())))
    if done:
        print(f"pi ~ {4 * inside / (len(done) * args.samples):.6f} from {len(done) * args.samples} samples")
    for f in res.failed[:10]:
        print(f"failed: {f}")
    if res.undone:
        shown = " ".join(map(str, res.undone[:50])) + (" ..." if len(res.undone) > 50 else "")
        print(f"undone tasks ({len(res.undone)}): {shown}")
        print("the allocation was ending: " + (f"submit again with --journal {args.journal} to run only these"
                                               if args.journal else "run these again (use --journal next time)"))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"summary": s, "per_node": per_node, "undone": res.undone,
                       "failed": [f.index for f in res.failed], "results": done,
                       "job_end_time": end}, fh)
    sys.stdout.flush()
    if res.failed or lost:
        return 1
    return 3 if res.undone else 0


if __name__ == "__main__":
    sys.exit(main())
