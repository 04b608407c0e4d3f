"""``ipmtc report`` on real maps: saved JSON, a journal, the timeline and the notebook display."""
from __future__ import annotations

import json

from click.testing import CliRunner

import ipmtc
from ipmtc import cli, report


def sleepy_or_fail(x):
    import time

    time.sleep(0.02)
    if x % 7 == 3:
        raise ValueError(f"task {x} fails")
    return x


def test_report_of_a_saved_map(rc, tmp_path):
    res = ipmtc.dynamic_map(sleepy_or_fail, range(40), client=rc, retries=1, progress=False)
    path = res.save(tmp_path / "run.json")
    s = res.summary()
    m = report.analyze(path).metrics
    assert (m["tasks"], m["ok"], m["failed"], m["retries"]) == (40, s["ok"], s["failed"], s["retries"])
    assert m["failed"] == 6 and m["retries"] == 6  # 3, 10, 17, 24, 31, 38: each raised twice
    assert m["engines"] == 4 and round(m["makespan_s"], 3) == s["makespan_s"]
    # every attempt counted once: the final failure is not also counted from the history
    busy = sum(r.duration_s for r in res.records) + sum(
        h[3] - h[2] for r in res.records for h in r.history[:-1 if r.outcome == "raised" else None])
    assert abs(m["busy_s"] - busy) < 1e-5 and 0 < m["efficiency"] <= 1

    png, page = tmp_path / "t.png", tmp_path / "r.html"
    out = CliRunner().invoke(cli.report, [str(path), "--plot", str(png), "--html", str(page)])
    assert out.exit_code == 0, out.output
    assert "tasks             40 (ok 34, failed 6, undone 0)" in out.output
    assert png.stat().st_size > 10_000 and "data:image/png;base64," in page.read_text()

    fig = res.plot_timeline()
    assert fig.ipmtc_rows == sorted({r.engine_id for r in res.records})
    kinds = {a.kind for a in report.attempts(report.load(res))}
    assert kinds == {"ok", "retried", "raised"}
    assert "efficiency" in res._repr_html_()


def test_report_of_a_journal(rc, tmp_path):
    db = tmp_path / "run.db"
    res = ipmtc.dynamic_map(sleepy_or_fail, range(30), client=rc, journal=str(db), progress=False)
    out = CliRunner().invoke(cli.report, [str(db), "--json"])
    assert out.exit_code == 0, out.output
    m = json.loads(out.stdout)["metrics"]
    assert (m["tasks"], m["ok"], m["failed"]) == (30, 26, 4)
    assert m["engines"] == len({r.engine_id for r in res.records})
    assert m["engine_losses"] is None and 0 < m["efficiency"] <= 1
    # a rerun takes everything from the journal: still one run's worth of recorded tasks
    ipmtc.dynamic_map(sleepy_or_fail, range(30), client=rc, journal=str(db), progress=False)
    assert report.analyze(db).metrics["tasks"] == 30
