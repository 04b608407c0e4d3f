"""``ipmtc demo``: an embedded local cluster, a small many-task job, a summary, stop."""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable


def monte_carlo_pi(seed: int) -> float:
    """One Monte Carlo task: estimate pi from 2,000 random points (a stand-in for a simulation)."""
    import random as _r

    rng = _r.Random(seed)
    hits = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(2_000))
    if _r.random() < 0.02:  # a flaky attempt now and then, as real codes have (retried)
        raise RuntimeError(f"simulated crash of task {seed}")
    return 4.0 * hits / 2_000


def run_demo(*, engines: int = 4, tasks: int = 2000, echo: Callable[[str], None] = print) -> dict:
    from . import cluster
    from .maps import dynamic_map, static_map

    profile = f"ipmtc-demo-{os.getpid()}"
    echo(f"starting a local cluster with {engines} engines (profile {profile}) ...")
    info = cluster.start(engines=engines, profile=profile, flags={"launcher": "local"})
    echo(f"  {info.n_engines} engines registered in {info.startup_s:.1f} s")
    try:
        rc = cluster.connect(profile)
        seeds = list(range(tasks))
        t0 = time.monotonic()
        res = dynamic_map(monte_carlo_pi, seeds, client=rc, retries=3, progress=True)
        dyn_s = time.monotonic() - t0
        ok = [v for v in res if isinstance(v, float)]
        est = sum(ok) / len(ok)
        s = res.summary()
        echo(f"dynamic_map: {s['ok']}/{s['tasks']} tasks ok in {dyn_s:.2f} s "
             f"({s['tasks'] / dyn_s:,.0f} tasks/s), {s['retries']} retries of flaky tasks, "
             f"{s['failed']} failed; pi ~ {est:.5f}")
        t0 = time.monotonic()
        res2 = static_map(monte_carlo_pi, seeds, client=rc, retries=3, progress=False)
        st_s = time.monotonic() - t0
        echo(f"static_map:  {res2.summary()['ok']}/{len(seeds)} ok in {st_s:.2f} s; "
             f"same results as dynamic: {list(res2) == list(res)}")
        rc.close()
        return {"dynamic": s, "static": res2.summary(), "pi": est}
    finally:
        _, n = cluster.stop(profile)
        echo(f"stopped the cluster ({n} processes)")


if __name__ == "__main__":  # pragma: no cover
    random.seed(0)
    run_demo()
