"""The mpi4py.futures baseline: ``mpiexec -n W+1 python -m mpi4py.futures _mpi_pool.py ...``.

Rank 0 is the master (MPIPoolExecutor), the W others are workers: the
study's "mpi4py dynamic" with one rank as the broker. Prints one JSON line:
tasks, workers, elapsed_s (the map alone, after a warm-up round), rate.

    --noop N            N no-op tasks
    --sleep N SECONDS   N tasks of time.sleep(SECONDS)
    --times FILE        one task per duration in FILE (a JSON list of seconds)
"""
import json
import sys
import time


def noop(x):
    return x


def sleep_task(t):
    time.sleep(t)
    return t


def main(argv):
    from mpi4py.futures import MPIPoolExecutor

    if argv[0] == "--noop":
        fn, items = noop, list(range(int(argv[1])))
    elif argv[0] == "--sleep":
        fn, items = sleep_task, [float(argv[2])] * int(argv[1])
    elif argv[0] == "--times":
        with open(argv[1]) as f:
            fn, items = sleep_task, json.load(f)
    else:
        raise SystemExit(__doc__)
    with MPIPoolExecutor() as ex:
        workers = ex.num_workers
        list(ex.map(noop, range(4 * workers)))  # warm-up: every worker up and connected
        t0 = time.perf_counter()
        n = sum(1 for _ in ex.map(fn, items))
        dt = time.perf_counter() - t0
    print(json.dumps({"tasks": n, "workers": workers, "elapsed_s": dt, "rate": n / dt}))


if __name__ == "__main__":
    main(sys.argv[1:])
