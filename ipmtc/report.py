"""``ipmtc report``: where the time of a map went.

Reads a run -- the JSON written by ``MapResult.save()``, an SQLite task journal
(``journal=`` of a map, ``ipmtc run``), or a :class:`~ipmtc.maps.result.MapResult`
in memory -- and computes tasks, failures, retries, engine losses, makespan,
the cluster's start-up time (when known), efficiency = busy time / (engines x
makespan), per-host utilization, idle gaps and the slowest tasks. Draws a
timeline (Gantt chart, one row per engine, one bar per task attempt, colored by
outcome) like the static/dynamic schedule figures of the study, and writes a
self-contained HTML page.

Busy time counts every attempt whose start and end are known. Attempts lost
with their engine have no recorded times: the timeline draws them from the
engine's last finished attempt to the start of their rerun (inferred, hatched)
and they do not count as busy. Journals keep one record per task (its last
attempt), no attempt history and no engine losses; with several driver runs in
one journal, each run's span counts once (engines x span, summed).
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ReportError
from .outcomes import FINAL, LOST, MEMORY, OK, RAISED, STRAGGLER, WALLTIME
from .stats import TaskStats, efficiency, task_stats

SQLITE_MAGIC = b"SQLite format 3\x00"
# timeline bar kinds: the outcomes, plus "retried" (raised, ran again) and "aborted" (straggler)
RETRIED, ABORTED_BAR = "retried", "aborted"
COLORS = {OK: "#4a9a3a", RETRIED: "#f0a030", RAISED: "#d62728", WALLTIME: "#8c4fbd", MEMORY: "#b5651d",
          ABORTED_BAR: "#17a2c0", LOST: "#8a8a8a"}
LABELS = {OK: "ok", RETRIED: "raised, retried", RAISED: "raised (failed)", WALLTIME: "killed by walltime",
          MEMORY: "killed past max_rss_mb", ABORTED_BAR: "straggler aborted",
          LOST: "lost with its engine (inferred)"}
HTML_PLOT_MAX_ATTEMPTS = 20_000  # notebook display draws the timeline up to this many bars


@dataclass
class Run:
    """A map's task records, normalized from any source."""

    records: list[dict[str, Any]]
    spans: list[tuple[float, float, int]]  # (start, end, engines) per driver run
    engine_losses: int | None = None
    startup_s: float | None = None
    schedule: str = ""
    source: str = ""


@dataclass
class Attempt:
    index: int
    engine: int | None
    host: str | None
    start: float
    end: float
    kind: str
    inferred: bool = False


@dataclass
class Report:
    run: Run
    metrics: dict[str, Any]
    hosts: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- loading

_REC_KEYS = ("index", "key", "engine_id", "host", "pid", "submitted", "started", "finished", "attempts",
             "resubmits", "outcome", "error", "history", "slots")


def _rec(d: dict[str, Any]) -> dict[str, Any]:
    r = {k: d.get(k) for k in _REC_KEYS}
    r["attempts"], r["resubmits"] = r["attempts"] or 0, r["resubmits"] or 0
    r["history"] = [tuple(h) for h in (r["history"] or [])]
    value = d.get("value")
    if not r["slots"] and isinstance(value, dict) and isinstance(value.get("engines"), list):
        r["slots"] = value["engines"]  # a wide command line in a journal: the engines it held
    r["slots"] = tuple(r["slots"] or ())
    return r


def _span(records, start, end, engines) -> list[tuple[float, float, int]]:
    times = [t for r in records for t in (r["started"], r["finished"]) if t]
    start = start if start is not None else min(times, default=None)
    end = end if end is not None else max(times, default=None)
    return [] if start is None or end is None else [(start, end, int(engines or 0))]


def from_result(res, startup_s: float | None = None) -> Run:
    """A :class:`Run` from a ``MapResult`` in memory."""
    from dataclasses import asdict

    recs = [_rec(asdict(r)) for r in res.records]
    return Run(recs, _span(recs, res.started_at, res.finished_at, res.n_engines), res.engine_losses,
               startup_s if startup_s is not None else getattr(res, "startup_s", None), res.schedule, "MapResult")


def _from_json(path: Path) -> Run:
    try:
        data = json.loads(path.read_text())
        recs = [_rec(r) for r in data["records"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReportError(f"{path} is neither a task journal nor records saved by MapResult.save() "
                          f"({type(e).__name__}: {e})") from None
    summ = data.get("summary") or {}
    startup = data.get("startup_s", (data.get("cluster") or {}).get("startup_s"))
    return Run(recs, _span(recs, data.get("started_at"), data.get("finished_at"),
                           data.get("n_engines", summ.get("engines"))),
               summ.get("engine_losses"), startup, summ.get("schedule") or "", f"{path} (MapResult.save)")


def _from_journal(path: Path) -> Run:
    from .journal import Journal

    jr = Journal.open(path, readonly=True)
    try:
        # a command run's values say which engines a wide line held (small dicts; other maps' values are not read)
        wide = (jr.function or "").endswith(":run_command")
        rows, runs = list(jr.rows(values=wide)), {r["run"]: r for r in jr.runs()}
    finally:
        jr.close()
    by_run: dict[Any, list] = {}
    for row in rows:
        row = dict(row, index=row.get("idx"))
        by_run.setdefault(row.get("run"), []).append(_rec(row))
    recs, spans = [], []
    for run_id, rs in sorted(by_run.items(), key=lambda kv: kv[0] or 0):
        recs += rs
        starts = [r["started"] for r in rs if r["started"]]
        begun = (runs.get(run_id) or {}).get("started")
        start = min([*starts, begun] if begun else starts, default=None)
        held = {e for r in rs for e in r["slots"]} | {r["engine_id"] for r in rs if r["engine_id"] is not None}
        spans += _span(rs, start, None, len(held))
    return Run(recs, spans, None, None, "", f"{path} (journal, {len(spans)} run{'s' * (len(spans) != 1)})")


def load(run, *, startup_s: float | None = None) -> Run:
    """A :class:`Run` from a path (journal or ``res.save()`` JSON), a ``MapResult`` or a ``Run``."""
    if isinstance(run, Run):
        return run
    if hasattr(run, "records") and hasattr(run, "engine_losses"):
        return from_result(run, startup_s)
    path = Path(run)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    out = _from_journal(path) if head == SQLITE_MAGIC else _from_json(path)
    if startup_s is not None:
        out.startup_s = startup_s
    return out


# ---------------------------------------------------------------- analysis


def attempts(run: Run) -> list[Attempt]:
    """Every attempt with known or inferred times; lost attempts last (inferred)."""
    out: list[Attempt] = []
    lost: list[tuple[int, int, float | None]] = []  # (engine, index, start of the next attempt)
    for r in run.records:
        hist = list(r["history"])
        final = None
        if r["outcome"] in FINAL and r["started"] is not None and r["finished"] is not None:
            final = (r["engine_id"], r["host"], r["started"], r["finished"], r["outcome"])
            # a failure is recorded both as the last history entry and as the final attempt
            if hist and r["outcome"] != OK and hist[-1][4] == r["outcome"] and \
                    (hist[-1][2], hist[-1][3]) == (r["started"], r["finished"]):
                hist.pop()
        seq = hist + ([final] if final else [])
        for pos, (eid, host, t0, t1, how) in enumerate(seq):
            last = final is not None and pos == len(seq) - 1
            kind = {RAISED: RAISED if last else RETRIED, WALLTIME: WALLTIME, MEMORY: MEMORY, OK: OK,
                    STRAGGLER: ABORTED_BAR, LOST: LOST}.get(how)
            if kind == LOST and (t0 is None or t1 is None):
                lost.append((eid, r["index"], next((s[2] for s in seq[pos + 1:] if s[2] is not None), None)))
            elif kind is not None and t0 is not None and t1 is not None:
                out.append(Attempt(r["index"], eid, host, t0, t1, kind))
                if last and r["slots"]:  # a wide line: as wide a bar, on every engine it held
                    out += [Attempt(r["index"], e, host, t0, t1, kind) for e in r["slots"] if e != eid]
    if lost:
        end_all = max((s[1] for s in run.spans), default=None)
        loss_at: dict[int, float] = {}
        for eid, _, nxt in lost:
            t = nxt if nxt is not None else end_all
            if t is not None and eid is not None:
                loss_at[eid] = min(loss_at.get(eid, t), t)
        unknown = [t for eid, _, nxt in lost if eid is None
                   if (t := nxt if nxt is not None else end_all) is not None]
        k = (run.engine_losses or 0) - len(loss_at)
        if unknown and k > 0:  # the engine of a lost attempt was not recorded: of the engines never seen
            t = min(unknown)  # again once the losses were handled, those that fell silent first
            last_end: dict[Any, float] = {}
            for a in out:
                last_end[a.engine] = max(last_end.get(a.engine, a.end), a.end)
            gone = {a.engine for a in out} - {a.engine for a in out if a.start >= t} - set(loss_at)
            loss_at.update({e: t for e in sorted(gone, key=lambda e: last_end[e])[:k] if e is not None})
        host_of = {a.engine: a.host for a in out}
        for eid, t in loss_at.items():
            before = [a.end for a in out if a.engine == eid and a.end <= t]
            t0 = max(before) if before else min((s[0] for s in run.spans), default=t)
            out.append(Attempt(-1, eid, host_of.get(eid), t0, t, LOST, inferred=True))
    return out


def lost_engines(atts: list[Attempt]) -> dict[int, float]:
    """engine -> (inferred) time it was lost."""
    return {a.engine: a.end for a in atts if a.kind == LOST and a.engine is not None}


def analyze(run, *, gap_s: float | None = None, top: int = 5, startup_s: float | None = None) -> Report:
    """Compute the report's numbers (see the module docstring for definitions)."""
    run = load(run, startup_s=startup_s)
    atts = attempts(run)
    timed = [a for a in atts if not a.inferred]
    makespan = sum(e - s for s, e, _ in run.spans)
    st = task_stats(run.records)
    if gap_s is None:
        gap_s = max(0.1, st.median_task_s) if st.median_task_s is not None else 0.1
    m = _summary_metrics(run, atts, timed, st, makespan, gap_s)
    hosts = _per_host(timed, makespan)
    gaps = _idle_gaps(run, timed, lost_engines(atts), gap_s)
    m["idle_gaps"] = len(gaps)
    m["idle_in_gaps_s"] = round(sum(g["gap_s"] for g in gaps), 6)
    return Report(run, m, hosts, gaps, _slowest(run.records, top))


def _summary_metrics(run: Run, atts: list[Attempt], timed: list[Attempt], st: TaskStats, makespan: float,
                     gap_s: float) -> dict[str, Any]:
    """The headline numbers: task counts, engine losses, makespan, busy time, efficiency."""
    busy = sum(a.end - a.start for a in timed)
    capacity = sum((e - s) * n for s, e, n in run.spans)
    engines = max((n for _, _, n in run.spans), default=0)
    # without any attempt history (a journal) engine losses cannot be told from the records
    losses = run.engine_losses if run.engine_losses is not None else (
        len(lost_engines(atts)) if any(r["history"] for r in run.records) else None)
    eff = efficiency(busy, capacity)
    return {"source": run.source, "schedule": run.schedule, "tasks": st.tasks, "ok": st.ok, "failed": st.failed,
            "undone": st.undone, "retries": st.retries, "resubmits": st.resubmits, "crashes": st.crashes,
            "engine_losses": losses, "engines": engines, "startup_s": run.startup_s,
            "makespan_s": round(makespan, 6), "busy_s": round(busy, 6),
            "efficiency": round(eff, 6) if eff is not None else None,
            "median_task_s": st.median_task_s, "gap_threshold_s": gap_s}


def _per_host(timed: list[Attempt], makespan: float) -> list[dict[str, Any]]:
    """Engines, attempts, busy time and utilization of each host, sorted by host name."""
    per_host: dict[str, dict[str, Any]] = {}
    for a in timed:
        h = per_host.setdefault(a.host or "unknown", {"host": a.host or "unknown", "engines": set(),
                                                       "attempts": 0, "busy_s": 0.0})
        h["engines"].add(a.engine)
        h["attempts"] += 1
        h["busy_s"] += a.end - a.start
    hosts = []
    for h in sorted(per_host.values(), key=lambda h: h["host"]):
        n = len(h["engines"])
        hosts.append({"host": h["host"], "engines": n, "attempts": h["attempts"], "busy_s": round(h["busy_s"], 6),
                      "utilization": round(h["busy_s"] / (n * makespan), 6) if makespan > 0 else None})
    return hosts


def _idle_gaps(run: Run, timed: list[Attempt], gone: dict[int, float], gap_s: float) -> list[dict[str, Any]]:
    """Idle stretches longer than ``gap_s`` per engine and driver run, longest first (times from the start)."""
    t_origin = min((s for s, _, _ in run.spans), default=0.0)
    gaps = []
    for s0, s1, _ in run.spans:
        by_engine: dict[Any, list[Attempt]] = {}
        for a in timed:
            if s0 <= a.start <= s1:
                by_engine.setdefault(a.engine, []).append(a)
        for eid, lst in by_engine.items():
            lst.sort(key=lambda a: a.start)
            edges = [(s0, lst[0].start, "start")]
            end = lst[0].end
            for a in lst[1:]:
                edges.append((end, a.start, "between"))
                end = max(end, a.end)
            if eid not in gone:  # a lost engine's silence after its loss is not idle time
                edges.append((end, s1, "end"))
            for g0, g1, where in edges:
                if g1 - g0 > gap_s:
                    gaps.append({"engine": eid, "host": lst[0].host, "from_s": round(g0 - t_origin, 6),
                                 "to_s": round(g1 - t_origin, 6), "gap_s": round(g1 - g0, 6), "where": where})
    gaps.sort(key=lambda g: (-g["gap_s"], g["from_s"], str(g["engine"])))
    return gaps


def _slowest(recs: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The ``top`` longest final attempts (ties: lowest task index first)."""
    finals = [r for r in recs if r["started"] is not None and r["finished"] is not None and r["outcome"] in FINAL]
    finals.sort(key=lambda r: (-(r["finished"] - r["started"]), r["index"]))
    return [{"task": r["index"], "engine": r["engine_id"], "host": r["host"],
             "duration_s": round(r["finished"] - r["started"], 6), "outcome": r["outcome"],
             "attempts": r["attempts"]} for r in finals[:top]]


# ---------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _table(rows: list[dict[str, Any]], style: str = "text") -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    if style == "html":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>" for row in cells)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    w = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    return "\n".join("  " + "  ".join(x.rjust(w[i]) if i else x.ljust(w[i]) for i, x in enumerate(row))
                     for row in [cols] + cells)


def _summary_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    eff = m["efficiency"]
    rows = [("tasks", f"{m['tasks']} (ok {m['ok']}, failed {m['failed']}, undone {m['undone']})"),
            ("retries", f"{m['retries']} (re-runs after the task raised or hit its walltime)"),
            ("resubmits", f"{m['resubmits']} (re-runs not charged: engine lost, straggler aborted)"),
            ("crashes", f"{m.get('crashes', 0)} (engines that died under a task running alone on them)"),
            ("engine losses", "not recorded" if m["engine_losses"] is None else m["engine_losses"]),
            ("engines", m["engines"]),
            ("cluster start-up", "unknown" if m["startup_s"] is None else f"{m['startup_s']:.2f} s"),
            ("makespan", f"{m['makespan_s']:.3f} s"), ("busy", f"{m['busy_s']:.3f} s (all timed attempts)"),
            ("efficiency", "-" if eff is None else f"{eff:.4f} = busy / (engines x makespan)"),
            ("median task", "-" if m["median_task_s"] is None else f"{m['median_task_s']:.4g} s"),
            ("idle gaps", f"{m['idle_gaps']} longer than {m['gap_threshold_s']:.3g} s, "
                          f"{m['idle_in_gaps_s']:.3f} s in all")]
    return [{"": k, "value": str(v)} for k, v in rows]


def text(rep: Report, max_gaps: int = 10) -> str:
    """The plain-text report ``ipmtc report`` prints."""
    m = rep.metrics
    out = [f"ipmtc report: {m['source']}" + (f", schedule {m['schedule']}" if m["schedule"] else "")]
    out += [f"  {r['']:17s} {r['value']}" for r in _summary_rows(m)]
    for title, rows in (("per-host utilization", rep.hosts),
                        (f"idle gaps (longest {max_gaps}; times from the map's start)", rep.gaps[:max_gaps]),
                        ("slowest tasks", rep.slowest)):
        if rows:
            out += ["", title, _table(rows)]
    return "\n".join(out)


def _new_figure(n_rows: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(10, min(20.0, 1.6 + 0.28 * max(n_rows, 1))), dpi=100)


def plot_timeline(run, path: str | Path | None = None, *, title: str | None = None):
    """Gantt chart: one row per engine, one bar per task attempt, colored by outcome; engine losses marked.

    ``run``: a ``MapResult``, a path (journal or saved JSON) or a :class:`Run`.
    Returns the matplotlib ``Figure`` (shown inline in a notebook); writes a PNG if ``path`` is given.
    """
    run = load(run)
    atts = attempts(run)
    engines = sorted({a.engine for a in atts}, key=lambda e: (e is None, e if e is not None else 0))
    row = {e: i for i, e in enumerate(engines)}
    t0 = min((s for s, _, _ in run.spans), default=min((a.start for a in atts), default=0.0))
    fig = _new_figure(len(engines))
    ax = fig.add_subplot(1, 1, 1)
    many = len(atts) > 2000
    for kind, color in COLORS.items():
        bars: dict[int, list] = {}
        for a in atts:
            if a.kind == kind:
                bars.setdefault(row[a.engine], []).append((a.start - t0, max(a.end - a.start, 1e-9)))
        for y, xs in bars.items():
            ax.broken_barh(xs, (y - 0.4, 0.8), facecolors=color, edgecolors="white" if not many else "none",
                           linewidth=0 if many else 0.4, hatch="//" if kind == LOST else None)
        if bars:
            ax.bar(0, 0, color=color, label=LABELS[kind], hatch="//" if kind == LOST else None)
    gone = lost_engines(atts)
    if gone:
        ax.scatter([t - t0 for t in gone.values()], [row[e] for e in gone], marker="X", s=70, color="black",
                   zorder=5, label="engine lost (its tasks rerun here)")
    hosts = {a.engine: a.host for a in atts if a.host}
    step = max(1, len(engines) // 60)
    ax.set_yticks(range(0, len(engines), step))
    ax.set_yticklabels([f"{e}" + (f" ({hosts[e]})" if e in hosts and len(set(hosts.values())) > 1 else "")
                        for e in engines[::step]], fontsize=8 if len(engines) < 40 else 6)
    ax.set_ylim(-0.6, len(engines) - 0.4)
    ax.invert_yaxis()
    for s, _end, _ in run.spans[1:]:  # journal: a new driver run starts here
        ax.axvline(s - t0, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, max((e for _, e, _ in run.spans), default=t0 + 1) - t0)
    ax.set_xlabel("seconds since the map started")
    ax.set_ylabel("engine")
    rep = analyze(run)
    eff = rep.metrics["efficiency"]
    ax.set_title(title or f"{rep.metrics['tasks']} tasks on {len(engines)} engines"
                 + (f", efficiency {eff:.3f}" if eff is not None else "")
                 + (f" ({run.schedule})" if run.schedule else ""), fontsize=10)
    if atts:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.ipmtc_rows = list(engines)  # engine of each row, top to bottom
    fig._repr_png_ = lambda: _png(fig)  # notebooks show it inline even without pyplot's inline backend
    if path is not None:
        fig.savefig(path, format="png")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_CSS = ("body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.2em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "th{background:#f2f2f2}img{max-width:100%}")


def html_page(rep: Report, png: bytes | None = None, *, full: bool = True) -> str:
    """A self-contained page (timeline embedded as base64 PNG); ``full=False``: a fragment for notebooks."""
    m = rep.metrics
    parts = [f"<h2>ipmtc report: {html.escape(m['source'])}</h2>" if full else
             f"<b>MapResult</b> ({html.escape(m['schedule'] or 'map')})", _table(_summary_rows(m), "html")]
    if png:
        parts.append(f'<img alt="timeline" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>')
    for title, rows in (("Per-host utilization", rep.hosts), ("Idle gaps (longest 20)", rep.gaps[:20]),
                        ("Slowest tasks", rep.slowest)):
        if rows and (full or title != "Idle gaps (longest 20)"):
            parts += [f"<h3>{title}</h3>" if full else f"<p><b>{title}</b></p>", _table(rows, "html")]
    body = "\n".join(parts)
    if not full:
        return f"<div>{body}</div>"
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>ipmtc report</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def html_fragment(res) -> str:
    """What a notebook shows for a ``MapResult``: the summary, the timeline (if matplotlib is there)."""
    rep = analyze(res)
    png = None
    try:
        if len(attempts(rep.run)) <= HTML_PLOT_MAX_ATTEMPTS:
            png = _png(plot_timeline(rep.run))
    except ImportError:
        pass
    return html_page(rep, png, full=False)


def write_html(rep: Report, path: str | Path) -> Path:
    png = _png(plot_timeline(rep.run))
    Path(path).write_text(html_page(rep, png))
    return Path(path)


__all__ = ["Attempt", "Report", "ReportError", "Run", "analyze", "attempts", "html_page", "load",
           "plot_timeline", "text", "write_html"]
