"""Start-up: time until N engines are registered, `ipmtc start` vs raw `ipcluster start` (ipyparallel defaults).

Both are timed the way a user meets them, from launching the command to all N
engines registered, local engines on this machine, alternating ipmtc and raw
(median of --repeats):

* ipmtc: ``python -m ipmtc start --engines N --launcher local`` (exits 0 once all N
  registered; its own "registered in X s" is reported too).
* raw:   ``ipcluster start -n N --daemonize`` with ipyparallel's defaults, then a
  client polls until ``len(rc.ids) == N``.

Every cluster runs under a private IPYTHONDIR and is stopped in ``finally``
(``ipmtc stop`` / ``ipcluster stop``, then any process left under that
IPYTHONDIR is killed by PID).

    python benchmarks/startup.py [--smoke] [--out DIR] [--engines 2 8 32] [--repeats 3]

Issue 2 target: ipmtc / raw <= 0.5 at N = 2 and 8.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def time_ipmtc(n: int, tag: str) -> tuple[float, float | None]:
    import ipmtc

    profile = f"su-ipmtc-{tag}"
    t0 = time.perf_counter()
    try:
        cp = subprocess.run([C.PY, "-m", "ipmtc", "start", "--engines", str(n), "--launcher", "local",
                             "--profile", profile, "--timeout-s", "300"], capture_output=True, text=True,
                            timeout=400, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        if cp.returncode != 0:
            raise RuntimeError(f"ipmtc start failed: {cp.stderr.strip()[-600:]}")
        m = re.search(r"registered in ([0-9.]+) s", cp.stdout)
        return wall, float(m.group(1)) if m else None
    finally:
        try:
            ipmtc.stop(profile)
        except ipmtc.NoClusterError:
            pass


def time_raw(n: int, tag: str, ipython_dir: Path) -> float:
    import ipyparallel as ipp

    profile = f"su-raw-{tag}"
    pdir = ipython_dir / f"profile_{profile}"
    ipcluster = C.venv_bin("ipcluster")
    t0 = time.perf_counter()
    rc = None
    try:
        subprocess.run([ipcluster, "start", "-n", str(n), f"--profile={profile}", "--daemonize"], check=True,
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        conn = pdir / "security" / "ipcontroller-client.json"
        deadline = t0 + 300
        while not conn.exists():
            if time.perf_counter() > deadline:
                raise TimeoutError("raw controller wrote no connection file")
            time.sleep(0.02)
        while rc is None:
            try:
                rc = ipp.Client(str(conn), timeout=30)
            except Exception:  # the file may be half-written
                time.sleep(0.05)
        while len(rc.ids) < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"raw: {len(rc.ids)}/{n} engines registered")
            time.sleep(0.02)
        return time.perf_counter() - t0
    finally:
        if rc is not None:
            rc.close()
        subprocess.run([ipcluster, "stop", f"--profile={profile}"], capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)


def main(argv=None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--engines", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    sizes = args.engines or ([2] if args.smoke else [2, 8, 32])
    repeats = args.repeats or (1 if args.smoke else 3)
    ipd = C.private_ipython_dir("startup")
    mach = C.machine()
    results: dict[int, dict[str, list]] = {}
    try:
        for n in sizes:
            r = results.setdefault(n, {"ipmtc": [], "ipmtc_internal": [], "raw": [],
                                       "load": C.machine()["loadavg"][0]})
            for k in range(repeats):
                tag = f"{n}-{k}"
                wall, internal = time_ipmtc(n, tag)
                r["ipmtc"].append(wall)
                r["ipmtc_internal"].append(internal)
                r["raw"].append(time_raw(n, tag, ipd))
                print(f"N={n} #{k}: ipmtc {wall:.2f} s (inside {internal} s), raw {r['raw'][-1]:.2f} s",
                      file=sys.stderr, flush=True)
    finally:
        left = C.kill_leftovers(ipd)
        if left:
            print(f"killed leftover processes {left}", file=sys.stderr)
    rows = []
    for n, r in results.items():
        if not r["raw"]:
            continue
        mi, mr = C.median(r["ipmtc"]), C.median(r["raw"])
        inside = C.median([x for x in r["ipmtc_internal"] if x is not None])
        rows.append([n, mi, inside, mr, mi / mr, "<= 0.5" if n in (2, 8) else "-",
                     ("yes" if mi / mr <= 0.5 else "no") if n in (2, 8) else "-", r["load"]])
    md = "\n".join([
        "### Start-up: time until N engines are registered (local engines)", "",
        C.machine_line(mach), "",
        f"Median of {repeats} (alternating); wall time from launching the command to all N registered. "
        "ipmtc: `python -m ipmtc start --engines N --launcher local` (\"inside\" = the start-up it reports, "
        "without Python start-up and imports); raw: `ipcluster start -n N --daemonize` with ipyparallel's "
        "defaults, polled by a client.", "",
        C.md_table(["N", "ipmtc start (s)", "ipmtc inside (s)", "raw ipcluster (s)", "ratio ipmtc/raw",
                    "target", "met", "load avg before"], rows)])
    C.write_outputs(args.out, "startup", md, {"machine": mach, "results": results})
    fig, (ax,) = C.new_figure()
    ns = list(results)
    for key, label in (("ipmtc", "ipmtc start"), ("raw", "raw ipcluster start")):
        ax.plot(ns, [C.median(results[n][key]) for n in ns], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("engines")
    ax.set_ylabel("seconds until all registered")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"Start-up time ({mach['cores']} cores)")
    fig.tight_layout()
    fig.savefig(args.out / "startup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
