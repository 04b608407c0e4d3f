"""Run every benchmark, one after the other, and write ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py [--smoke] [--out DIR] [--only startup throughput ...] [-- extra args]

Each benchmark runs as its own process (``python benchmarks/<name>.py --out DIR``)
and writes ``DIR/<name>.md``, ``.json`` and ``.png``; RESULTS.md (next to the
outputs' folder, or ``--results``) collects the tables with the machine's core
count, load and date. A benchmark that fails is reported as such; the others
still run. (journal_overhead.py is separate: ``python benchmarks/journal_overhead.py``.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCHMARKS = ["startup", "throughput", "weak_scaling", "faults", "model", "memory", "security", "packing", "scale"]
PNGS = {"startup": ["startup.png"], "throughput": ["throughput.png"],
        "weak_scaling": ["weak_scaling.png", "weak_scaling_timeline_static.png", "weak_scaling_timeline_dynamic.png"],
        "faults": ["faults.png"], "model": ["model.png"], "memory": [], "security": [], "packing": [], "scale": []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=C.DEFAULT_OUT)
    ap.add_argument("--results", type=Path, default=None, help="default: <out>/../RESULTS.md")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
    ap.add_argument("--no-run", action="store_true", help="only collect the outputs already in --out")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    results = args.results or out.parent / "RESULTS.md"
    mach = C.machine()
    sections, status = [], []
    for name in args.only:
        argv_b = [sys.executable, str(C.HERE / f"{name}.py"), "--out", str(out)] + (["--smoke"] if args.smoke else [])
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        md_path = out / f"{name}.md"
        if args.no_run:
            code = 0 if md_path.exists() else "no output"
        else:
            print(f"== {name}: {' '.join(argv_b[1:])}", file=sys.stderr, flush=True)
            code = subprocess.run(argv_b, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode
        took = time.monotonic() - t0
        ok = code == 0 and md_path.exists()
        if args.no_run and ok:  # when it ran: its own record
            try:
                load0 = json.loads((out / f"{name}.json").read_text())["machine"]["loadavg"][0]
            except (OSError, ValueError, KeyError):
                load0 = None
        status.append([name, "ok" if ok else f"FAILED (exit {code})", "-" if args.no_run else f"{took:.0f}",
                       "-" if load0 is None else f"{load0:.1f}"])
        if ok:
            body = md_path.read_text().strip()
            pics = [p for p in PNGS[name] if (out / p).exists()]
            rel = os.path.relpath(out, results.parent)
            body += "\n\n" + "  ".join(f"![{p}]({rel}/{p})" for p in pics)
            sections.append(body)
        else:
            sections.append(f"### {name}: FAILED (exit {code}); see its stderr")
    head = [
        "# ipmtc benchmark results", "",
        f"Machine: {mach['host']}, {mach['cores']} cores, Python {mach['python']}, ipyparallel {mach['ipyparallel']}. "
        + (f"Collected on {mach['date']} by `python benchmarks/run_all.py --no-run` from the outputs in "
           f"`{os.path.relpath(out, results.parent)}/` (each table says when it ran)"
           if args.no_run else f"Generated on {mach['date']} by `python benchmarks/run_all.py"
                               f"{' --smoke' if args.smoke else ''}`")
        + "; each benchmark can be rerun alone "
        "(`python benchmarks/<name>.py [--smoke] [--out DIR]`). Every benchmark starts its own clusters under a "
        "private IPYTHONDIR and stops them when done; baselines are measured in the same run on the same machine. "
        "Each table gives the load average when it started: where it exceeds the core count, other jobs shared "
        "the cores and the figures (ipmtc's and the baselines' alike) are pessimistic and noisier.",
        "", C.md_table(["benchmark", "status", "seconds", "load average at its start"], status), ""]
    results.write_text("\n".join(head + ["\n\n".join(sections), ""]))
    print(f"wrote {results}", file=sys.stderr)
    return 0 if all(s[1] == "ok" for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
