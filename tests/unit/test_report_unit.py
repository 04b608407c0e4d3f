"""``ipmtc report`` on hand-computed runs: exact numbers, timeline rows, HTML, CLI errors."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ipmtc import cli, report
from ipmtc.maps.result import MapResult, TaskRecord

FIXTURE = Path(__file__).parent / "fixtures" / "report_run.json"


def _result_from_fixture() -> MapResult:
    data = json.loads(FIXTURE.read_text())
    res = MapResult(n_engines=3, schedule="dynamic")
    res.started_at, res.finished_at, res.engine_losses = 1000.0, 1010.0, 1
    res.records = [TaskRecord(**{**r, "history": [tuple(h) for h in r["history"]]}) for r in data["records"]]
    return res


def test_numbers_of_the_hand_computed_run():
    rep = report.analyze(FIXTURE, gap_s=0.75, top=3)
    m = rep.metrics
    # busy: t0 4 + t1 3 + t2 (1 + 2) + t3 4 + t4 (1 + 2) = 17 s (t4's failure is counted once, not twice)
    assert (m["tasks"], m["ok"], m["failed"], m["undone"]) == (5, 4, 1, 0)
    assert (m["retries"], m["resubmits"], m["engine_losses"], m["engines"]) == (2, 1, 1, 3)
    assert m["startup_s"] == 2.5 and m["schedule"] == "dynamic"
    assert m["makespan_s"] == 10.0 and m["busy_s"] == 17.0
    assert m["efficiency"] == round(17 / 30, 6)
    assert m["median_task_s"] == 3.5  # ok tasks: 4, 3, 2, 4
    # host a: engines 0 and 1, 6 attempts, 16 s busy -> 16 / (2 x 10); host b: engine 2, 1 s of 10
    assert rep.hosts == [
        {"host": "a", "engines": 2, "attempts": 6, "busy_s": 16.0, "utilization": 0.8},
        {"host": "b", "engines": 1, "attempts": 1, "busy_s": 1.0, "utilization": 0.1},
    ]
    # engine 0 idles 1004-1005 and 1009-1010; engine 1's half-second gaps are under 0.75 s;
    # engine 2 was lost: no trailing gap
    assert rep.gaps == [
        {"engine": 0, "host": "a", "from_s": 4.0, "to_s": 5.0, "gap_s": 1.0, "where": "between"},
        {"engine": 0, "host": "a", "from_s": 9.0, "to_s": 10.0, "gap_s": 1.0, "where": "end"},
    ]
    assert (m["idle_gaps"], m["idle_in_gaps_s"]) == (2, 2.0)
    assert [(s["task"], s["duration_s"]) for s in rep.slowest] == [(0, 4.0), (3, 4.0), (1, 3.0)]


def test_gap_threshold_and_default():
    rep = report.analyze(FIXTURE, gap_s=0.4)
    assert rep.metrics["idle_gaps"] == 6 and rep.metrics["idle_in_gaps_s"] == 4.0  # + engine 1's four 0.5 s gaps
    auto = report.analyze(FIXTURE)  # default threshold: the median ok task (3.5 s): no gap that long
    assert auto.metrics["gap_threshold_s"] == 3.5 and auto.metrics["idle_gaps"] == 0


def test_attempts_kinds_and_inferred_loss():
    atts = report.attempts(report.load(FIXTURE))
    kinds = sorted(a.kind for a in atts)
    assert kinds == ["lost", "ok", "ok", "ok", "ok", "raised", "retried", "retried"]
    lost = next(a for a in atts if a.kind == "lost")
    # from engine 2's last attempt (ended 1001) to the rerun of the lost task (started 1005)
    assert (lost.engine, lost.start, lost.end, lost.inferred) == (2, 1001.0, 1005.0, True)


def test_in_memory_result_gives_the_same_numbers():
    res = _result_from_fixture()
    a = report.analyze(res, gap_s=0.75).metrics
    b = report.analyze(FIXTURE, gap_s=0.75).metrics
    for k in ("tasks", "failed", "retries", "resubmits", "engine_losses", "makespan_s", "busy_s", "efficiency"):
        assert a[k] == b[k], k


def test_timeline_png_has_one_row_per_engine(tmp_path):
    out = tmp_path / "timeline.png"
    fig = report.plot_timeline(FIXTURE, out)
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.ipmtc_rows == [0, 1, 2]
    ax = fig.axes[0]
    assert len(ax.get_yticks()) == 3
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"ok", "raised, retried", "raised (failed)", "lost with its engine (inferred)",
            "engine lost (its tasks rerun here)"} <= labels


def test_map_result_methods(tmp_path):
    res = _result_from_fixture()
    fig = res.plot_timeline(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0 and fig.ipmtc_rows == [0, 1, 2]
    page = res._repr_html_()
    assert "data:image/png;base64," in page and "efficiency" in page and "0.5667" in page


def test_html_page_is_self_contained(tmp_path):
    rep = report.analyze(FIXTURE, gap_s=0.75)
    path = report.write_html(rep, tmp_path / "r.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "Per-host utilization" in page and "Slowest tasks" in page and "Idle gaps" in page
    assert "src=\"http" not in page and "<script" not in page


def test_text_report():
    out = report.text(report.analyze(FIXTURE, gap_s=0.75))
    for needle in ("tasks             5 (ok 4, failed 1, undone 0)", "engine losses     1",
                   "cluster start-up  2.50 s", "makespan          10.000 s", "efficiency        0.5667",
                   "per-host utilization", "slowest tasks", "idle gaps"):
        assert needle in out, needle


def _noop(x):
    return x


def test_report_of_a_journal(tmp_path):
    from ipmtc.journal import Journal

    path = tmp_path / "run.db"
    jr = Journal.open(path, fn=_noop)
    t = time.time() + 10
    jr.add(TaskRecord(index=0, key="k0", engine_id=0, host="h", pid=1, started=t + 1, finished=t + 3, attempts=1,
                      outcome="ok"), 0)
    jr.add(TaskRecord(index=1, key="k1", engine_id=1, host="h", pid=2, started=t + 1, finished=t + 2, attempts=1,
                      outcome="ok"), 1)
    jr.add(TaskRecord(index=2, key="k2", engine_id=1, host="h", pid=2, started=t + 2.5, finished=t + 4,
                      attempts=2, outcome="raised", error="ValueError: no"), None)
    jr.close()
    ro = Journal.open(path, readonly=True)
    run_start = ro.runs()[0]["started"]
    ro.close()
    m = report.analyze(path).metrics
    span = t + 4 - run_start  # from the driver's start to the last finish
    assert (m["tasks"], m["ok"], m["failed"], m["retries"], m["engines"]) == (3, 2, 1, 1, 2)
    assert m["engine_losses"] is None and m["startup_s"] is None  # journals do not record them
    assert m["busy_s"] == pytest.approx(4.5) and m["makespan_s"] == pytest.approx(span, abs=1e-6)
    assert m["efficiency"] == pytest.approx(4.5 / (2 * span), abs=1e-6)
    assert report.plot_timeline(path).ipmtc_rows == [0, 1]


def test_cli(tmp_path):
    cmd = cli.report
    runner = CliRunner()
    png, page = tmp_path / "t.png", tmp_path / "r.html"
    r = runner.invoke(cmd, [str(FIXTURE), "--plot", str(png), "--html", str(page), "--gap-s", "0.75"])
    assert r.exit_code == 0, r.output
    assert "efficiency        0.5667" in r.output and png.stat().st_size > 0 and page.stat().st_size > 0
    r = runner.invoke(cmd, [str(FIXTURE), "--json", "--startup-s", "4"])
    assert r.exit_code == 0 and json.loads(r.stdout)["metrics"]["startup_s"] == 4.0


@pytest.mark.parametrize("content", [None, "not json", '{"records": 3}', "SQLite format 3\0garbage" * 50])
def test_cli_bad_run_file(tmp_path, content):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    r = CliRunner().invoke(cli.report, [str(path)])
    assert r.exit_code == 1 and "ipmtc: error:" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_lost_attempt_without_engine_is_attributed_to_the_engine_never_seen_again():
    run = report.load(FIXTURE)
    rec = next(r for r in run.records if r["index"] == 3)
    rec["history"] = [(None, None, None, None, "lost")]  # the dispatcher did not know the engine
    lost = [a for a in report.attempts(run) if a.kind == "lost"]
    assert [(a.engine, a.start, a.end) for a in lost] == [(2, 1001.0, 1005.0)]
    run.engine_losses = 0  # no loss recorded: nothing is inferred
    assert not [a for a in report.attempts(run) if a.kind == "lost"]


def test_timeline_figure_displays_inline_without_pyplot():
    from IPython.core.formatters import PNGFormatter

    fig = report.plot_timeline(FIXTURE)
    png = PNGFormatter()(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
