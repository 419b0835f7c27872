"""`edgegen bundle`: verify, inspect, list, pull and serve bundles; keygen and sign them."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

bundle_app = typer.Typer(help="Verify, inspect, list, sign, pull and serve bundles.",
                         no_args_is_help=True)
console = Console()

TRUST_HELP = ("Trusted public key (PEM) or a directory of *.pub keys; repeatable. The bundle "
              "must carry a valid signature by one of them.")


@bundle_app.command("verify")
def verify(
    path: Path = typer.Argument(..., help="Bundle directory."),
    trust: list[Path] = typer.Option(None, "--trust", help=TRUST_HELP),
) -> None:
    """Recompute every file's sha256 against the manifest and check the signatures; exit 1
    naming any bad file, or an untrusted, missing or broken signature."""
    from edge_agent.bundle import open_bundle
    from edge_agent.bundle.signing import load_trust, signature_status

    policy = load_trust(trust)
    b = open_bundle(path)
    status = signature_status(b, policy)
    console.print(
        f"[green]ok[/] {b.name} {b.digest12} ({len(b.manifest['files'])} files verified; "
        f"{status})", highlight=False, soft_wrap=True
    )


@bundle_app.command("keygen")
def keygen(
    key: Path = typer.Argument(..., help="Private key file to write (mode 0600), e.g. "
                               "release.key."),
    pub: Path = typer.Option(None, "--pub", help="Public key file (default: KEY with a .pub "
                             "suffix).", show_default=False),
) -> None:
    """Make an Ed25519 key pair for signing bundles; never overwrites a file."""
    from edge_agent.bundle.signing import generate_keypair

    private, public, kid = generate_keypair(key, pub)
    console.print(f"[green]ok[/] key {kid}: private {private} (keep it secret), "
                  f"public {public} (give it to agents: --trust-key)", highlight=False,
                  soft_wrap=True)


@bundle_app.command("sign")
def sign(
    path: Path = typer.Argument(..., help="Bundle directory."),
    key: Path = typer.Option(..., "--key", help="Private key (from `edgegen bundle keygen`)."),
) -> None:
    """Verify the bundle's files, then add a signature over its digest (edgegen.sig; the
    digest does not change). Signing again with another key adds a second signature."""
    from edge_agent.bundle.signing import load_private_key, read_signatures, sign_bundle

    b, sig = sign_bundle(path, load_private_key(key))
    n = len(read_signatures(b.path))
    console.print(f"[green]ok[/] signed {b.name} {b.digest12} with key {sig.key_id} "
                  f"({n} signature{'s' if n != 1 else ''})", highlight=False, soft_wrap=True)


@bundle_app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., help="Bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a bundle's manifest: source, precision, signature, validation figures, files."""
    from edge_agent.bundle import open_bundle
    from edge_agent.bundle.signing import read_signatures

    b = open_bundle(path, verify=False)
    signed_by = [s.key_id for s in read_signatures(b.path)]
    if as_json:
        typer.echo(json.dumps({"digest": b.digest, "signed_by": signed_by, **b.manifest},
                              indent=2, sort_keys=True))
        return
    table = manifest_table(b.manifest, b.digest)
    table.add_row("signed by", ", ".join(signed_by) or "unsigned")
    console.print(table)


def manifest_table(m: dict, digest: str) -> Table:
    """The manifest as a two-column table (shared with `edgegen export`'s report)."""
    t = Table(title=f"bundle {m['name']} {digest[:12]}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    src = m.get("source", {})
    sig = m.get("signature", {})
    rows = [
        ("digest", digest),
        ("task", m["task"]),
        ("precision", m["precision"]),
        ("exporter / runtime", f"{m.get('exporter')} / {m['runtime']}"),
        ("source", f"{src.get('kind')}: {src.get('reference')}"),
        ("source sha256", str(src.get("sha256"))),
        ("context length", str(m["context_length"])),
        (
            "signature",
            ", ".join(f"{k}={v}" for k, v in sig.items() if not isinstance(v, (list, dict))),
        ),
        ("created", f"{m['created']} by edgegen {m['edgegen_version']}"),
    ]
    for key, value in (m.get("validation") or {}).items():
        if not isinstance(value, (list, dict)):
            rows.append((f"validation.{key}", str(value)))
    size = sum(f["size"] for f in m["files"].values())
    rows.append(("files", f"{len(m['files'])} files, {size / 1e6:.1f} MB"))
    for k, v in rows:
        t.add_row(k, v)
    return t


@bundle_app.command("list")
def list_(
    store: Path = typer.Argument(None, help="Bundle store (default: $EDGEGEN_STORE or "
                                 "~/.cache/edgegen/bundles)."),
) -> None:
    """List the bundles in a store, newest first per name."""
    from edge_agent.bundle import default_store, iter_bundles

    store = store or default_store()
    t = Table(title=f"bundles in {store}", title_justify="left")
    for col in ("name", "digest", "precision", "task", "runtime", "size MB", "created", "path"):
        t.add_column(col)
    for b in iter_bundles(store):
        size = sum(f["size"] for f in b.manifest["files"].values()) / 1e6
        t.add_row(b.name, b.digest12, b.precision, b.task, b.runtime, f"{size:.1f}",
                  b.manifest["created"], str(b.path))
    console.print(t)


@bundle_app.command("pull")
def pull(
    url: str = typer.Argument(..., help="Bundle URL (http://host:port/<name>/<digest12>/)."),
    store: Path = typer.Option(None, "--store", help="Bundle store (default: $EDGEGEN_STORE "
                               "or ~/.cache/edgegen/bundles)."),
    trust: list[Path] = typer.Option(None, "--trust", help=TRUST_HELP + " Checked before any "
                                     "file is downloaded: a refused bundle leaves nothing."),
) -> None:
    """Download a bundle into the store: resumable, every file sha256-verified."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edge_agent.bundle import default_store
    from edge_agent.bundle.fetch import fetch_bundle
    from edge_agent.bundle.signing import load_trust

    policy = load_trust(trust)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        b = fetch_bundle(url, store or default_store(), progress=progress, trust=policy)
    console.print(f"[green]ok[/] {b.name} {b.digest12} -> {b.path}")


@bundle_app.command("serve")
def serve(
    store: Path = typer.Argument(..., help="Bundle store to publish."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
) -> None:
    """Publish a store over HTTP (Range requests supported) for `edgegen bundle pull`/agents."""
    import uvicorn

    from edge_agent.bundle.publish import create_bundle_server

    if not store.is_dir():
        raise typer.BadParameter(f"{store} is not a directory", param_hint="STORE")
    uvicorn.run(create_bundle_server(store), host=host, port=port, log_config=None)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
