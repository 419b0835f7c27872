"""`edgegen rollout start|status|pause|resume|abort`: fleet rollouts through the desired
state in Consul's KV store (``manifests.fleet_rollout``); options in, library calls out."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

console = Console()
app = typer.Typer(help="Roll a bundle out to the fleet in waves with health gates, "
                       "through Consul's KV store; nothing restarts.", no_args_is_help=True)

CONSUL = typer.Option("http://127.0.0.1:8500", "--consul", help="Consul (or edgegen registry).")
TOKEN = typer.Option(None, "--consul-token", envvar="CONSUL_HTTP_TOKEN", show_envvar=False,
                     help="Consul ACL token with key:write on edgegen/ (default "
                          "$CONSUL_HTTP_TOKEN; a literal here is visible in `ps`).")
TOKEN_FILE = typer.Option(None, "--consul-token-file", envvar="CONSUL_HTTP_TOKEN_FILE",
                          show_envvar=False, dir_okay=False,
                          help="File holding the token (default $CONSUL_HTTP_TOKEN_FILE).")

WAVES = typer.Option(None, "--waves", help="Cumulative wave sizes: counts or % "
                     "(default 1,10%,50%,100%).")
GROUPS = typer.Option(None, "--groups", help="Only these groups (regions), in this order: "
                      "eu-west,us-east.")
BAKE = typer.Option(60.0, "--bake", help="Seconds each wave's health is watched.")
GATES = typer.Option(None, "--gates", help="e.g. 'error_rate<=0.05, ttft_p95<=2x, "
                     "tokens_per_s>=0.5x' (x: relative to nodes on the old bundle).")
INCONCLUSIVE = typer.Option("pause", "--inconclusive", help="A wave too quiet to judge: "
                            "pause (wait for `rollout resume` or `abort`), promote, or fail.")
PROMETHEUS = typer.Option(None, "--prometheus", help="Read the gates' figures from this "
                          "Prometheus (series labelled instance=<address:port> as the agents "
                          "registered) instead of each agent's /metrics.")

_STYLE = {"switched": "green", "pre-pulled": "cyan", "deferred": "yellow", "failed": "red",
          "rolled back": "magenta", "waiting": "dim"}


def _kv(consul: str, token: str | None, token_file: Path | None):
    from cloud_router.credentials import consul_token
    from manifests.consul_kv import ConsulKV

    return ConsulKV(consul, consul_token(token, token_file))


def rollout_options(waves: str | None, groups: str | None, bake: float, gates: str | None,
                    inconclusive: str):
    from manifests.fleet_rollout import RolloutOptions
    from manifests.gates import DEFAULT_GATES
    from manifests.waves import DEFAULT_WAVES

    return RolloutOptions(waves=waves or DEFAULT_WAVES, gates=gates or DEFAULT_GATES,
                          groups=tuple(g for g in (groups or "").split(",") if g) or None,
                          bake_s=bake, inconclusive=inconclusive)


def view_table(view: dict) -> Table:
    """Per wave and per node: digest, state, gate figures."""
    t = Table(title=f"rollout {view['id']} -> {view['digest'][:12]}: {view['state']}",
              title_justify="left")
    for col in ("wave", "node", "group", "state", "bundle", "detail"):
        t.add_column(col)
    waves = {w["name"]: w for w in view["waves"]}
    for row in view["nodes"]:
        state = row["state"]
        t.add_row(row["wave"], row["node"], row["group"],
                  f"[{_STYLE.get(state, 'white')}]{state}[/]", row["digest"], row["detail"])
    for name, w in waves.items():
        t.add_row(name, "", "", w["state"], "", w.get("gates", ""), end_section=name == "canary")
    return t


def start(
    bundle: Path = typer.Argument(..., help="The bundle directory (its digest is rolled out)."),
    bundle_url: str = typer.Option(..., "--bundle-url",
                                   help="Where agents fetch it (an `edgegen bundle serve`)."),
    consul: str = CONSUL, consul_token: str = TOKEN, consul_token_file: Path = TOKEN_FILE,
    waves: str = WAVES, groups: str = GROUPS, bake: float = BAKE, gates: str = GATES,
    inconclusive: str = INCONCLUSIVE, prometheus: str = PROMETHEUS,
) -> None:
    """Pre-pull the bundle on every node, then switch wave by wave; a failed gate rolls every
    switched node back from its own disk and exits non-zero."""
    from edge_agent.bundle import open_bundle
    from manifests.fleet_metrics import PrometheusMetrics
    from manifests.fleet_rollout import FleetRollout

    b = open_bundle(bundle)
    options = rollout_options(waves, groups, bake, gates, inconclusive)
    kv = _kv(consul, consul_token, consul_token_file)
    with Live(Table(title="rollout: planning"), console=console, refresh_per_second=4) as live:
        run = FleetRollout(kv, b.digest, bundle_url, options,
                           progress=lambda v: live.update(view_table(v.to_dict())),
                           metrics=PrometheusMetrics(prometheus) if prometheus else None)
        view = run.run()
    console.print(f"[green]rolled out[/] {b.name} {b.digest12} to "
                  f"{sum(1 for r in view.nodes.values() if r.state == 'switched')} nodes; "
                  f"deferred: {', '.join(n for n, r in view.nodes.items() if r.state == 'deferred') or 'none'}")


def status(consul: str = CONSUL, consul_token: str = TOKEN,
           consul_token_file: Path = TOKEN_FILE) -> None:
    """The last rollout's waves and nodes, as it wrote them."""
    from edge_agent.desired import LOCK_KEY, STATE_KEY

    kv = _kv(consul, consul_token, consul_token_file)
    raw = kv.get(STATE_KEY)
    if raw is None:
        console.print("no rollout has run")
        return
    console.print(view_table(json.loads(raw)))
    lock = kv.get(LOCK_KEY)
    console.print(f"running: {lock.decode()}" if lock else "no rollout running")


def _control(command: str, consul: str, token: str | None, token_file: Path | None) -> None:
    from edge_agent.desired import CONTROL_KEY, LOCK_KEY

    kv = _kv(consul, token, token_file)
    if kv.get(LOCK_KEY) is None and command != "resume":
        raise typer.BadParameter("no rollout is running")
    kv.put(CONTROL_KEY, command.encode())
    console.print(f"{command}: the running rollout reads it before its next step")


def pause(consul: str = CONSUL, consul_token: str = TOKEN,
          consul_token_file: Path = TOKEN_FILE) -> None:
    """Hold the running rollout before its next step."""
    _control("pause", consul, consul_token, consul_token_file)


def resume(consul: str = CONSUL, consul_token: str = TOKEN,
           consul_token_file: Path = TOKEN_FILE) -> None:
    """Let a paused rollout go on."""
    _control("resume", consul, consul_token, consul_token_file)


def abort(consul: str = CONSUL, consul_token: str = TOKEN,
          consul_token_file: Path = TOKEN_FILE,
          force: bool = typer.Option(False, "--force", help="Also release the lock of a "
                                     "rollout whose process is gone (it can no longer read "
                                     "the abort), so the next deploy may start.")) -> None:
    """Stop the running rollout: every switched node goes back to its last good bundle."""
    _control("abort", consul, consul_token, consul_token_file)
    if force:
        from edge_agent.desired import LOCK_KEY

        _kv(consul, consul_token, consul_token_file).delete(LOCK_KEY)
        console.print("lock released")


for _cmd in (start, status, pause, resume, abort):
    app.command(_cmd.__name__)(_cmd)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="rollout")
