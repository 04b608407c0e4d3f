"""The ``ipmtc`` command: a thin click layer over the library.

An :class:`IpmtcError` becomes one line on stderr and exit status 1 (2 for
usage errors, as click does); anything else keeps its traceback because it
is a bug.
"""
from __future__ import annotations

import functools
import sys
import time

import click

from . import cluster as _cluster
from . import presets as _presets
from .errors import IpmtcError


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ipmtc")
def main() -> None:
    """Many-task computing on HPC clusters with IPython Parallel."""


preset_option = click.option("--preset", "preset", metavar="NAME|FILE",
                             help="built-in preset name or YAML file (default: dynamic or $IPMTC_PRESET)")
profile_option = click.option("--profile", metavar="NAME",
                              help="IPython profile (default: ipmtc-<jobid>, or ipmtc-local)")
set_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                          help="override one preset key (repeatable), e.g. --set hwm=0")


@main.command()
@click.option("--nodes", type=int, help="nodes of the allocation to use (default: all)")
@click.option("--engines-per-node", type=int, help="engines on each node (default: the job's tasks per node)")
@click.option("--engines", type=int, help="total engines (default: one per task slot / core)")
@click.option("--launcher", type=click.Choice(_presets.LAUNCHERS), help="how engines start")
@preset_option
@profile_option
@set_option
@click.option("--timeout-s", type=float, help="how long to wait for all engines to register")
@click.option("--foreground", is_flag=True, help="stay in the foreground; Ctrl-C or SIGTERM stops the cluster")
@_fail_cleanly
def start(nodes, engines_per_node, engines, launcher, preset, profile, sets, timeout_s, foreground):
    """Start a controller here and engines across the allocation."""
    flags = {**_parse_sets(sets), "engines_per_node": engines_per_node, "launcher": launcher,
             "start_timeout_s": timeout_s}
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            click.echo(f"\rengines {done}/{total} registered", nl=done >= total, err=True)
        else:
            click.echo(f"engines {done}/{total} registered", err=True)

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
@_fail_cleanly
def status(profile):
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
    click.echo(f"  engines: {st['engines']}/{st['expected_engines']} registered")
    for host, n in st["engines_per_host"].items():
        click.echo(f"    {host}: {n}")
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
    from . import allocation, launch, profile as _profile

    resolved = _presets.resolve(preset, _parse_sets(sets))
    alloc = allocation.detect()
    plan = launch.plan_engines(resolved.preset, alloc, engines=engines)
    resolved = _presets.concretize(resolved, plan.n_engines)
    pdir = _profile.write_profile(resolved, plan, alloc, name or _profile.default_name(alloc))
    click.echo(str(pdir))


@main.command()
@click.option("--engines", type=int, default=4, show_default=True, help="local engines")
@click.option("--tasks", type=int, default=2000, show_default=True, help="tasks in the demo map")
@_fail_cleanly
def demo(engines, tasks):
    """Start a local cluster, run a small many-task job, print a summary, stop."""
    from .demo import run_demo

    run_demo(engines=engines, tasks=tasks, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    main()
