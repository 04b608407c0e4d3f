"""The ``ipmtc`` command: a thin click layer over the library.

An :class:`IpmtcError` becomes one line on stderr and exit status 1; a usage
error (bad flag value, missing argument) one line and exit status 2, as click
gives it but without the usage block; anything else keeps its traceback
because it is a bug.
"""
from __future__ import annotations

import functools
import signal
import sys
import time

import click

from . import cluster as _cluster
from . import presets as _presets
from .errors import IpmtcError
from .outcomes import OK


def _fail_cleanly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except IpmtcError as e:
            msg = str(e)
            click.echo(f"ipmtc: error: {msg}", err=True)
            sys.exit(1)
    return wrapper


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--set")
        out[key.strip().replace("-", "_")] = value
    return out


class _OneLineGroup(click.Group):
    """Click's own usage errors (a bad flag value, a missing argument) as one line too, exit status 2."""

    def main(self, args=None, prog_name=None, **kwargs):
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "ipmtc"
            click.echo(f"ipmtc: error: {e.format_message()} (see `{where} --help`)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("ipmtc: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ipmtc")
def main() -> None:
    """Many-task computing on HPC clusters with IPython Parallel."""


preset_option = click.option("--preset", "preset", metavar="NAME|FILE",
                             help="built-in preset name or YAML file (default: dynamic or $IPMTC_PRESET)")
profile_option = click.option("--profile", metavar="NAME",
                              help="IPython profile (default: ipmtc-<jobid>, or ipmtc-local)")
set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="override one preset key (repeatable), e.g. --set hwm=0")


def engine_options(f):
    """The options that say how many engines, where and with what (``start`` and ``add``)."""
    for opt in reversed([
        click.option("--nodes", type=int, help="nodes of the allocation to use (default: all)"),
        click.option("--engines-per-node", type=int, help="engines on each node (default: the job's tasks per node)"),
        click.option("--engines", type=int, help="total engines (default: one per task slot / core)"),
        click.option("--cores-per-engine", type=int, metavar="K",
                     help="pin each engine to K cores (engines per node = cores / K; OMP_NUM_THREADS=K)"),
        click.option("--gpus-per-engine", type=int, metavar="G",
                     help="each engine sees G GPUs of its own (engines per node = GPUs / G)"),
        click.option("--threads-per-engine", type=int, metavar="T",
                     help="OMP/MKL/OpenBLAS threads (default: its cores)"),
        click.option("--pool", "pools", multiple=True, metavar="NAME:KEY=V,...",
                     help="a named engine pool (repeatable), e.g. --pool gpu:gpus-per-engine=1 "
                          "--pool cpu:cores-per-engine=1"),
        click.option("--launcher", type=click.Choice(_presets.LAUNCHERS), help="how engines start"),
        preset_option, profile_option, set_option,
        click.option("--timeout-s", type=float, help="how long to wait for all engines to register"),
    ]):
        f = opt(f)
    return f


def _engine_flags(sets, engines_per_node, launcher, timeout_s, cores_per_engine, gpus_per_engine,
                  threads_per_engine, pools) -> dict:
    return {**_parse_sets(sets), "engines_per_node": engines_per_node, "launcher": launcher,
            "start_timeout_s": timeout_s, "cores_per_engine": cores_per_engine,
            "gpus_per_engine": gpus_per_engine, "threads_per_engine": threads_per_engine,
            "pools": list(pools) or None}


@main.command()
@engine_options
@click.option("--foreground", is_flag=True, help="stay in the foreground; Ctrl-C or SIGTERM stops the cluster")
@_fail_cleanly
def start(nodes, engines_per_node, engines, cores_per_engine, gpus_per_engine, threads_per_engine, pools, launcher,
          preset, profile, sets, timeout_s, foreground):
    """Start a controller here and engines across the allocation."""
    flags = _engine_flags(sets, engines_per_node, launcher, timeout_s, cores_per_engine, gpus_per_engine,
                          threads_per_engine, pools)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            click.echo(f"\rengines {done}/{total} registered", nl=done >= total, err=True)
        else:
            click.echo(f"engines {done}/{total} registered", err=True)

    if foreground:
        # from now on SIGTERM is Ctrl-C: a start it cuts short leaves nothing running, and one that came
        # between the start and the wait below stops the cluster too
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    info = None
    try:
        info = _cluster.start(preset=preset, flags=flags, nodes=nodes, engines=engines, profile=profile,
                              on_progress=progress)
        hosts = sorted({e.get("node", "?") for e in info.engines.values()})
        click.echo(f"ipmtc: {info.n_engines} engines registered in {info.startup_s:.1f} s "
                   f"({info.launcher} on {len(hosts)} node{'s' if len(hosts) != 1 else ''}: {', '.join(hosts)}); "
                   f"profile {info.profile}")
        click.echo(f"  {info.attach_hint()}")
        click.echo(f"  stop:   ipmtc stop --profile {info.profile}")
        if foreground:
            click.echo("  running in the foreground; Ctrl-C stops the cluster", err=True)
            _cluster.wait_foreground(info)
    except KeyboardInterrupt:
        if not foreground:
            raise
        if info is not None:
            _cluster.stop_cluster(info)
        click.echo("ipmtc: stopped", err=True)


@main.command()
@engine_options
@click.option("--foreground", is_flag=True,
              help="stay until SIGTERM/Ctrl-C (e.g. this job's walltime warning), then drain and stop these engines")
@click.option("--submit", is_flag=True, help="write and submit a batch job (sbatch/qsub) that runs this add itself")
@click.option("--time", "time_limit", metavar="T", help="--submit: the job's walltime (e.g. 1:00:00)")
@click.option("--partition", metavar="P", help="--submit: partition / queue")
@click.option("--account", metavar="A", help="--submit: account to charge")
@_fail_cleanly
def add(nodes, engines_per_node, engines, cores_per_engine, gpus_per_engine, threads_per_engine, pools, launcher,
        preset, profile, sets, timeout_s, foreground, submit, time_limit, partition, account):
    """Add engines to a running cluster: from its allocation, another job's script, or a job it submits."""
    from . import elastic

    flags = _engine_flags(sets, engines_per_node, launcher, timeout_s, cores_per_engine, gpus_per_engine,
                          threads_per_engine, pools)
    if submit:
        info = _cluster.find(profile)
        args: list[str] = []  # the same add, run by the job on its own nodes
        for flag, value in (("--nodes", nodes), ("--engines-per-node", engines_per_node), ("--engines", engines),
                            ("--cores-per-engine", cores_per_engine), ("--gpus-per-engine", gpus_per_engine),
                            ("--threads-per-engine", threads_per_engine), ("--launcher", launcher),
                            ("--preset", preset), ("--timeout-s", timeout_s)):
            if value is not None:
                args += [flag, str(value)]
        for flag, values in (("--pool", pools), ("--set", sets)):
            for value in values:
                args += [flag, value]
        job = elastic.submit(info.profile, args, nodes=nodes or 1, time_limit=time_limit, partition=partition,
                             account=account, tasks_per_node=engines_per_node)
        click.echo(f"ipmtc: submitted job {job}: it adds engines to cluster {info.profile} when it starts "
                   f"(its output: {info.profile_dir}/log/)")
        return

    def progress(done: int, total: int) -> None:
        click.echo(f"engines {done}/{total} added", err=True)

    added = elastic.add(profile, engines=engines, nodes=nodes, preset=preset, flags=flags, on_progress=progress)
    n = len(added.ids)
    click.echo(f"ipmtc: {n} engine{'s' * (n != 1)} added ({added.origin}): ids {added.ids[0]}..{added.ids[-1]}")
    if foreground:
        click.echo("  in the foreground; SIGTERM or Ctrl-C drains and stops them", err=True)
        elastic.wait_then_leave(added, _cluster.find(profile).profile)
        click.echo(f"ipmtc: the {len(added.ids)} engines added from {added.origin} left")


@main.command()
@profile_option
@click.option("--engines", type=int, metavar="K", help="the K newest engines leave")
@click.option("--ids", metavar="I,J,...", help="these engines leave")
@click.option("--host", metavar="H", help="the engines on this node leave")
@click.option("--job", metavar="J", help="the engines added from batch job J leave")
@click.option("--no-wait", is_flag=True, help="return at once instead of when they are gone")
@click.option("--timeout-s", type=float, default=3600.0, show_default=True, help="how long to wait for them")
@_fail_cleanly
def remove(profile, engines, ids, host, job, no_wait, timeout_s):
    """Drain engines: maps hand them nothing more, each exits after what it holds (no loss, no failure)."""
    from . import elastic

    id_list = None
    if ids is not None:
        try:
            id_list = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise click.BadParameter(f"{ids!r}: give engine ids like 3,4,7", param_hint="--ids") from None
    t0 = time.monotonic()
    gone = elastic.remove(profile, engines=engines, ids=id_list, host=host, job=job, wait=not no_wait,
                          timeout_s=timeout_s)
    verb = "left" if not no_wait else "asked to leave"
    click.echo(f"ipmtc: engines {gone} {verb} ({time.monotonic() - t0:.1f} s)")


@main.command()
@profile_option
@click.option("--force", is_flag=True, help="clean up after a damaged state file")
@_fail_cleanly
def stop(profile, force):
    """Stop the cluster (all its processes, by process group)."""
    t0 = time.monotonic()
    if force and profile:
        try:
            _cluster.stop(profile)
        except IpmtcError:
            _cluster.force_clean(profile)
        click.echo(f"ipmtc: cleaned up profile {profile}")
        return
    info, n = _cluster.stop(profile)
    click.echo(f"ipmtc: stopped cluster {info.profile} ({n} processes) in {time.monotonic() - t0:.1f} s")


@main.command()
@profile_option
@click.option("--verbose", "-v", is_flag=True, help="list every engine's pool, cores and GPUs, however many")
@_fail_cleanly
def status(profile, verbose):
    """Engines per host, tasks queued/running/done, uptime."""
    st = _cluster.status(profile)
    if not st["running"]:
        click.echo(f"cluster {st['profile']}: NOT running (controller gone); `ipmtc stop --profile "
                   f"{st['profile']}` cleans up")
        sys.exit(1)
    up = st["uptime_s"]
    click.echo(f"cluster {st['profile']}: running, up {int(up // 3600)}h{int(up % 3600 // 60):02d}m"
               f"{int(up % 60):02d}s, controller {st['controller']}")
    click.echo(f"  {st['allocation']}; launcher {st['launcher']}; start-up {st['startup_s']:.1f} s")
    click.echo(f"  engines: {st['engines']}/{st['expected_engines']} registered; restarts: {st.get('restarts', 0)}"
               + (f"; given up (engines kept dying): {', '.join(st['given_up'])}" if st.get("given_up") else ""))
    for host, n in st["engines_per_host"].items():
        click.echo(f"    {host}: {n}")
    origins = st.get("origins", {})
    if len(origins) > 1:
        click.echo("  by origin: " + ", ".join(f"{o}: {n}" for o, n in origins.items()))
    pools = st.get("pools", {})
    if len(pools) > 1 or any(p.get("cores_per_engine", 1) > 1 or p.get("gpus", 0) for p in pools.values()):
        for name, p in pools.items():
            click.echo(f"  pool {name}: {p['engines']} engines, {p['tasks_running']} tasks running, "
                       f"{p['tasks_done']} done")
    rows = st.get("engine_rows", [])
    if rows and (len(rows) <= 64 or verbose):
        click.echo(f"  {'engine':>6s} {'pool':10s} {'node':12s} {'cores':10s} {'cpus':10s} {'gpus':8s} origin")
        for r in rows:
            click.echo(f"  {r['id']:>6} {r['pool']:10s} {r['node']:12s} {r['cores'] or '-':10s} {r['cpus'] or '-':10s} "
                       f"{r['gpus'] or '-':8s} {r.get('origin', '')}")
    elif rows:
        click.echo(f"  ({len(rows)} engines: --verbose lists each one's cores and GPUs)")
    click.echo(f"  tasks: {st['tasks_queued']} queued, {st['tasks_running']} running, {st['tasks_done']} done")


@main.command("list")
@_fail_cleanly
def list_cmd():
    """Clusters of this user (in $IPYTHONDIR)."""
    rows = _cluster.list_clusters()
    if not rows:
        click.echo("no ipmtc clusters")
        return
    for c in rows:
        state = "running" if c.running else "dead (run ipmtc stop to clean up)"
        click.echo(f"{c.profile:24s} {state:10s} {c.n_engines:5d} engines  {c.launcher:8s} {c.allocation}")


@main.group()
def presets():
    """Built-in presets and their resolved values."""


@presets.command("list")
@_fail_cleanly
def presets_list():
    """List the built-in presets."""
    for name in _presets.builtin_names():
        desc = _presets.load_builtin(name).get("description", "")
        click.echo(f"{name:10s} {desc}")


@presets.command("show")
@click.argument("name", required=False)
@click.option("--engines", type=int, help="resolve 'auto' values for this many engines")
@set_option
@_fail_cleanly
def presets_show(name, engines, sets):
    """Resolved values of a preset and where each came from."""
    resolved = _presets.resolve(name, _parse_sets(sets))
    if engines:
        resolved = _presets.concretize(resolved, engines)
    click.echo(_presets.to_yaml(resolved), nl=False)


@main.group()
def profile():
    """IPython profiles generated from presets."""


@profile.command("create")
@preset_option
@click.option("--name", metavar="NAME", help="profile name (default: ipmtc-<jobid>)")
@click.option("--engines", type=int, help="engine count used for 'auto' values")
@set_option
@_fail_cleanly
def profile_create(preset, name, engines, sets):
    """Write the profile (controller, engine, cluster config) without starting anything."""
    click.echo(str(_cluster.create_profile(preset=preset, flags=_parse_sets(sets), engines=engines, profile=name)))


@main.command()
@click.option("--engines", type=int, default=4, show_default=True, help="local engines")
@click.option("--tasks", type=int, default=2000, show_default=True, help="tasks in the demo map")
@_fail_cleanly
def demo(engines, tasks):
    """Start a local cluster, run a small many-task job, print a summary, stop."""
    from .demo import run_demo

    run_demo(engines=engines, tasks=tasks, echo=click.echo)


@main.command("run")
@click.argument("tasks_file", metavar="TASKS.txt", type=click.Path(dir_okay=False, path_type=str))
@profile_option
@click.option("--outdir", type=click.Path(file_okay=False, path_type=str),
              help="where <line>.out and <line>.err go (default: TASKS.txt.out/)")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="re-runs of a command that fails (non-zero exit or walltime)")
@click.option("--max-rss-mb", type=click.FloatRange(min=0, min_open=True),
              help="kill a command whose processes' resident memory grows past this (MB); retried like a failure")
@click.option("--walltime-s", type=click.FloatRange(min=0, min_open=True),
              help="kill a command (its whole process group) after this many seconds")
@click.option("--journal", "journal_path", type=click.Path(dir_okay=False, path_type=str),
              help="task journal; done lines are skipped on a rerun (default: TASKS.txt.journal.db)")
@click.option("--retry-failed", is_flag=True, help="also rerun the lines the journal records as failed")
@click.option("--drain-margin-s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="inside a batch job, start no command that would not end this long before the job does")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--continue-jobs", type=click.IntRange(min=1), metavar="N",
              help="inside a batch job: if lines are left undone when the job ends, submit this job script again "
                   "(after this job; up to N jobs in all) to carry on from the journal")
@_fail_cleanly
def run(tasks_file, profile, outdir, retries, walltime_s, max_rss_mb, journal_path, retry_failed, drain_margin_s,
        no_progress, continue_jobs):
    """Run a file of shell commands (one per line) over the cluster's engines.

    Blank lines and # comments are skipped. A non-zero exit status is a failure.
    Rerunning the same command after a crash or Ctrl-C skips the lines already done.
    Exit status: 0 if every command succeeded, 1 otherwise, 130 when interrupted (Ctrl-C),
    143 when terminated (SIGTERM); what finished before is recorded either way.
    """
    import signal

    from . import commands as _commands

    tasks = _commands.read_task_file(tasks_file)
    outdir = outdir or f"{tasks_file}.out"
    journal_path = journal_path or f"{tasks_file}.journal.db"
    jr = _commands.open_journal(journal_path, outdir, retry_failed=retry_failed)
    rc = None
    t0 = time.monotonic()
    jerr = None
    terminated = []

    def on_sigterm(signum, frame):  # scancel / the batch system's warning signal: record what finished, stop
        terminated.append(signum)
        raise KeyboardInterrupt

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rc = _cluster.connect(profile)
        n_engines = len(rc.ids)
        try:
            res = _commands.run_commands(tasks, client=rc, outdir=outdir, retries=retries, walltime_s=walltime_s,
                                         max_rss_mb=max_rss_mb,
                                         journal=jr, retry_failed=retry_failed, progress=not no_progress,
                                         drain_margin_s=drain_margin_s)
        except IpmtcError as e:
            if getattr(e, "result", None) is None:
                raise
            res, jerr = e.result, e  # journal or engines failed: the finished part is still reported
        summary = _commands.summarize(res, tasks, jr)
    except KeyboardInterrupt:
        jr.close()
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        click.echo(f"\nipmtc run: {how}; {jr.n_recorded} commands were recorded in journal {journal_path} "
                   "by this run; run the same command again to continue", err=True)
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        jr.close()
        if rc is not None:
            rc.close()
    for line in _commands.format_summary(summary, outdir=outdir, journal_path=journal_path,
                                         elapsed_s=time.monotonic() - t0, n_engines=n_engines):
        click.echo(line)
    if jerr is not None:
        click.echo(f"ipmtc: error: {jerr}", err=True)
        sys.exit(1)
    if continue_jobs and summary["undone"]:
        from . import campaign

        nxt = campaign.follow_on(summary["undone"], continue_jobs)
        if nxt is not None:
            click.echo(f"ipmtc run: {summary['undone']} lines left undone: submitted follow-on job {nxt} "
                       f"(campaign job {campaign.job_number() + 1} of at most {continue_jobs}); it resumes from "
                       f"journal {journal_path}")
            sys.exit(1 if summary["failed"] else 0)
        click.echo(f"ipmtc run: {summary['undone']} lines left undone and this was campaign job "
                   f"{campaign.job_number()} of at most {continue_jobs}: no follow-on job", err=True)
    if summary["failed"] or summary["undone"]:
        sys.exit(1)


@main.group()
def journal():
    """Inspect task journals (``journal=`` of a map, ``ipmtc run``)."""


@journal.command("show")
@click.argument("path", metavar="RUN.db", type=click.Path(dir_okay=False, path_type=str))
@click.option("--failed", "failed_only", is_flag=True, help="list every failed task (and export only those)")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=str), metavar="OUT",
              help="export the tasks as CSV")
@click.option("--jsonl", "jsonl_out", type=click.Path(dir_okay=False, path_type=str), metavar="OUT",
              help="export the tasks as JSON Lines")
@_fail_cleanly
def journal_show(path, failed_only, csv_out, jsonl_out):
    """Counts by outcome, failed tasks with their errors; export to CSV / JSON Lines."""
    from .journal import Journal

    jr = Journal.open(path, readonly=True)
    try:
        meta, counts, runs = jr.meta(), jr.counts(), jr.runs()
        total = sum(counts.values())
        last = runs[-1] if runs else None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["started"])) if last else "-"
        click.echo(f"journal {path}: map of {meta.get('function')}, {total} tasks recorded in {len(runs)} "
                   f"run{'s' if len(runs) != 1 else ''} (last started {when}"
                   + (f" by pid {last['pid']} on {last['host']})" if last else ")"))
        click.echo(f"  {'outcome':10s} {'tasks':>8s}")
        for outcome in sorted(counts, key=lambda o: (o != OK, o)):
            click.echo(f"  {outcome:10s} {counts[outcome]:8d}")
        click.echo(f"  {'total':10s} {total:8d}")
        failed = list(jr.rows(failed_only=True))
        if failed:
            limit = None if failed_only else 20
            click.echo(f"failed tasks ({len(failed)}):")
            click.echo(f"  {'index':>7s} {'attempts':>8s} {'host':12s} error")
            for r in failed[:limit]:
                err = " ".join((r["error"] or "").split())
                click.echo(f"  {r['idx'] if r['idx'] is not None else '-':>7} {r['attempts'] or 0:8d} "
                           f"{(r['host'] or '-')[:12]:12s} {err[:160]}")
            if limit is not None and len(failed) > limit:
                click.echo(f"  ... and {len(failed) - limit} more (--failed lists them all)")
        for out, fmt in ((csv_out, "csv"), (jsonl_out, "jsonl")):
            if out:
                n = _export_journal(jr, out, fmt, failed_only)
                click.echo(f"wrote {n} tasks to {out} ({fmt})")
    finally:
        jr.close()


def _export_journal(jr, out: str, fmt: str, failed_only: bool) -> int:
    import csv
    import json

    from .errors import JournalError

    def jsonable(v):
        try:
            json.dumps(v)
            return v
        except (TypeError, ValueError):
            return repr(v)

    cols = ["key", "idx", "outcome", "attempts", "resubmits", "engine_id", "host", "pid", "started", "finished",
            "duration_s", "error", "run", "recorded", "value"]
    n = 0
    try:
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=cols) if fmt == "csv" else None
            if writer:
                writer.writeheader()
            for r in jr.rows(failed_only=failed_only, values=True):
                r["duration_s"] = (r["finished"] - r["started"]) if r["started"] and r["finished"] else None
                r["value"] = jsonable(r["value"])
                if writer:
                    if not isinstance(r["value"], str) and r["value"] is not None:
                        r["value"] = json.dumps(r["value"])
                    writer.writerow(r)
                else:
                    f.write(json.dumps({c: r.get(c) for c in cols}) + "\n")
                n += 1
    except OSError as e:
        raise JournalError(f"cannot write {out}: {e.strerror}") from None
    return n


@main.command("report")
@click.argument("run", metavar="RUN", type=click.Path(dir_okay=False, path_type=str))
@click.option("--plot", "plot_path", metavar="PNG", type=click.Path(dir_okay=False, path_type=str),
              help="draw the timeline (one row per engine, one bar per attempt) as PNG")
@click.option("--html", "html_path", metavar="HTML", type=click.Path(dir_okay=False, path_type=str),
              help="write a self-contained HTML page (tables + embedded timeline)")
@click.option("--gap-s", type=float, help="list idle gaps longer than this (default: max(0.1 s, median task))")
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True, help="slowest tasks listed")
@click.option("--startup-s", type=float, help="the cluster's start-up time, if the run file does not say")
@click.option("--json", "as_json", is_flag=True, help="print the numbers as JSON instead of text")
@_fail_cleanly
def report(run, plot_path, html_path, gap_s, top, startup_s, as_json):
    """Tasks, failures, retries, engine losses, makespan, efficiency, utilization, idle gaps, slowest tasks.

    RUN is a task journal (SQLite) or the JSON written by MapResult.save().
    """
    import json

    from . import report as _report  # matplotlib is imported only for --plot / --html
    from .errors import ReportError

    rep = _report.analyze(run, gap_s=gap_s, top=top, startup_s=startup_s)
    if as_json:
        click.echo(json.dumps({"metrics": rep.metrics, "hosts": rep.hosts, "idle_gaps": rep.gaps,
                               "slowest": rep.slowest}, indent=1, default=str))
    else:
        click.echo(_report.text(rep))
    try:
        if plot_path:
            _report.plot_timeline(rep.run, plot_path)
            click.echo(f"timeline: {plot_path}", err=as_json)
        if html_path:
            _report.write_html(rep, html_path)
            click.echo(f"html: {html_path}", err=as_json)
    except ImportError:
        raise ReportError("--plot and --html need matplotlib: pip install 'ipmtc[plot]'") from None
    except OSError as e:
        raise ReportError(f"cannot write {e.filename}: {e.strerror}") from None


if __name__ == "__main__":  # pragma: no cover
    main()
