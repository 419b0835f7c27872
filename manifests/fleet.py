"""A local fleet: the embedded registry, Mosquitto, a bundle server, one agent per node of a
cluster file (run from the rendered container specs, see `manifests.local`) and the router.

Used by `edgegen deploy --target local` and `edgegen up`. Processes are started in order,
each waited for (HTTP readiness) before the next that needs it; stop() ends them in reverse.
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import httpx

from cloud_router.credentials import SECRET_FILE_VARIABLES, FleetSecrets, write_fleet_secrets
from edge_agent.mqtt.contract import DEVICE_USER
from edge_agent.mqtt.credentials import (
    PASSWORD_ENV,
    BrokerCredentials,
    device_instructions,
    write_broker_credentials,
)
from manifests.errors import LocalFleetError
from manifests.local import Node, ProcessSpec, load_cluster, node_processes, router_process
from manifests.render import BundleRef, DeployConfig, mosquitto_conf, render

log = logging.getLogger(__name__)
EDGEGEN = (sys.executable, "-m", "cli.main")
MOSQUITTO = "/usr/sbin/mosquitto"


@dataclass
class FleetOptions:
    cluster: str | Path | None = None
    bundle: str | None = None
    router_port: int = 8080
    registry_port: int = 8500
    mqtt_port: int = 1883
    mqtt_anonymous: bool = False      # devices may connect without a password (opt-in)
    deploy_config: DeployConfig | None = None
    workdir: Path | None = None
    ready_timeout: float = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or (MOSQUITTO if os.path.exists(MOSQUITTO) else None)
    if not path:
        raise LocalFleetError("Mosquitto is not installed: `sudo apt-get install mosquitto` "
                              "(Debian/Ubuntu) or `brew install mosquitto` (macOS)")
    return path


@dataclass
class Fleet:
    """The running processes of one local fleet."""

    opts: FleetOptions
    workdir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    agents: dict[str, int] = field(default_factory=dict)   # node -> port
    registry_url: str = ""
    router_url: str = ""
    mqtt_url: str = ""
    agent_env: dict = field(default_factory=dict, repr=False)   # secrets the agents get
    secrets: FleetSecrets | None = None   # Consul ACL tokens and the fleet key (files, 0600)
    bundle: BundleRef | None = None
    temporary: bool = False   # the workdir is the fleet's own: stop() deletes it

    def _spawn(self, name: str, argv, env: dict | None = None) -> subprocess.Popen:
        log_path = self.workdir / "logs" / f"{name.replace('/', '-')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "wb")
        p = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                             start_new_session=True)
        self.procs.append((name, p))
        log.info("started", extra={"process": name, "pid": p.pid})
        return p

    def _wait_http(self, name: str, url: str, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalFleetError(f"{name} exited with {proc.returncode}; see "
                                      f"{self.workdir / 'logs'}:\n{self.log_tail(name)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise LocalFleetError(f"{name} not ready at {url} after {timeout:.0f}s:\n"
                              f"{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        p = self.workdir / "logs" / f"{name.replace('/', '-')}.log"
        try:
            return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _run_init(self, spec: ProcessSpec, timeout: float) -> None:
        p = self._spawn(spec.name, spec.argv, spec.env)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LocalFleetError(f"{spec.name} did not finish in {timeout:.0f}s") from None
        if rc != 0:
            raise LocalFleetError(f"{spec.name} failed ({rc}):\n{self.log_tail(spec.name)}")

    def start(self, console=None) -> "Fleet":
        o = self.opts
        say = console.print if console else (lambda *a, **k: None)
        nodes = load_cluster(o.cluster)
        # 1. registry (stands in for Consul) and broker
        self.registry_url = f"http://127.0.0.1:{o.registry_port}"
        # ACLs on: new tokens and a fleet key, in files; each process gets its own in its
        # environment, never in argv; anyone may read (README: ACL tokens, fleet key).
        self.secrets = write_fleet_secrets(self.workdir / "secrets", anonymous_read=True)
        no_secret_files = dict.fromkeys(SECRET_FILE_VARIABLES, "")
        reg = self._spawn("registry", [*EDGEGEN, "registry", "--port", str(o.registry_port),
                                       "--data-dir", str(self.workdir / "registry"),
                                       "--acl-file", str(self.secrets.acl_file)])
        self._wait_http("registry", f"{self.registry_url}/v1/status/leader", reg, 60)
        say(f"registry  {self.registry_url}")
        if o.mqtt_port:
            conf = self.workdir / "mosquitto.conf"
            (self.workdir / "mosquitto").mkdir(exist_ok=True)
            creds = write_broker_credentials(self.workdir / "mqtt")   # new passwords, 0600
            self.agent_env[PASSWORD_ENV] = creds.agent_password()   # env, never argv
            conf.write_text(mosquitto_conf(
                o.mqtt_port, f"{self.workdir / 'mosquitto'}/", host="127.0.0.1",
                password_file=str(creds.passwd), acl_file=str(creds.acl),
                allow_anonymous=o.mqtt_anonymous,
                user=getpass.getuser() if os.geteuid() == 0 else None))
            self._spawn("mosquitto", [find_mosquitto(), "-c", str(conf)])
            self._wait_tcp("mosquitto", o.mqtt_port, 30)
            self.mqtt_url = f"mqtt://127.0.0.1:{o.mqtt_port}"
            say(f"mqtt      {self.mqtt_url}" + ("  (anonymous devices allowed)"
                                                 if o.mqtt_anonymous else ""))
            for line in device_instructions(creds, self.mqtt_url)[:2]:
                say(f"          {line}")
        # 2. publish the bundle so the init containers pull it as nodes would
        from edge_agent.bundle import open_bundle

        b = open_bundle(o.bundle, verify=False)
        store = Path(b.path).parent.parent
        bport = free_port()
        srv = self._spawn("bundle-server", [*EDGEGEN, "bundle", "serve", str(store),
                                            "--port", str(bport)])
        url = f"http://127.0.0.1:{bport}/{b.name}/{b.digest12}/"
        self._wait_http("bundle-server", url + "edgegen.json", srv, 60)
        self.bundle = BundleRef(b.name, b.digest, url)
        cfg = o.deploy_config or DeployConfig(bundle=self.bundle)
        cfg = replace(cfg, bundle=self.bundle, consul_address=self.registry_url,
                      mqtt=bool(o.mqtt_port), mqtt_anonymous=o.mqtt_anonymous)
        docs = render(cfg)
        # 3. agents, one per node, from the rendered specs
        started: list[tuple[Node, ProcessSpec, subprocess.Popen]] = []
        for node in nodes:
            port = free_port()
            overrides = {"EDGEGEN_STORE": str(self.workdir / "nodes" / node.name / "bundles"),
                         "EDGEGEN_CONSUL": self.registry_url, "EDGEGEN_MQTT": self.mqtt_url,
                         **self.agent_env, **self.secrets.env("agent")}
            for spec in node_processes(docs, node, port, overrides, EDGEGEN):
                if spec.init:
                    self._run_init(spec, 600)
                else:
                    started.append((node, spec, self._spawn(
                        spec.name, spec.argv, {**spec.env, **no_secret_files})))
                    self.agents[node.name] = port
        for node, spec, p in started:
            self._wait_http(spec.name, f"http://127.0.0.1:{spec.port}/readyz", p, o.ready_timeout)
            say(f"agent     {node.name:14} {node.tier:7} {node.region:9} "
                f"http://127.0.0.1:{spec.port}")
        # 4. the router
        rspec = router_process(docs, o.router_port, {"EDGEGEN_CONSUL": self.registry_url,
                                                     **self.secrets.env("router")}, EDGEGEN)
        rp = self._spawn("router", rspec.argv, {**rspec.env, **no_secret_files})
        self.router_url = f"http://127.0.0.1:{o.router_port}"
        self._wait_http("router", f"{self.router_url}/readyz", rp, 120)
        say(f"router    {self.router_url}")
        return self

    def _wait_tcp(self, name: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise LocalFleetError(f"{name} did not listen on port {port}:\n{self.log_tail(name)}")

    def alive(self) -> list[str]:
        return [n for n, p in self.procs if p.poll() is None]

    def stop(self, timeout: float = 15.0, keep_logs: bool = False) -> None:
        """SIGTERM every process (last started first), SIGKILL what outlives ``timeout``; then
        delete a temporary workdir (each node's copy of the bundle is a bundle's size), all
        but its logs when ``keep_logs`` (a fleet that failed: its error points at them)."""
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if not self.temporary:
            return
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for entry in self.workdir.iterdir():
            if entry.is_dir() and entry.name != "logs":
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_file():
                entry.unlink()


def start_fleet(opts: FleetOptions, console=None) -> Fleet:
    if opts.workdir:
        fleet = Fleet(opts, Path(opts.workdir))
    else:
        fleet = Fleet(opts, Path(tempfile.mkdtemp(prefix="edgegen-fleet-")), temporary=True)
    try:
        return fleet.start(console)
    except BaseException as e:
        fleet.stop(keep_logs=not isinstance(e, KeyboardInterrupt))
        raise


def device_login(fleet: Fleet) -> list[str]:
    """The `edgegen mqtt chat` options a device of this fleet logs in with (none if its broker
    has no device password)."""
    password_file = BrokerCredentials(fleet.workdir / "mqtt").device_password_file
    if not password_file.exists():
        return []
    return ["--mqtt-username", DEVICE_USER, "--mqtt-password-file", str(password_file)]


def try_it(fleet: Fleet) -> list[str]:
    """Commands to try a running fleet with: a chat request through the router, one over
    MQTT, and the status of the agents."""
    body = (f'{{"model": "{fleet.bundle.name}", "messages": '
            f'[{{"role": "user", "content": "Hello!"}}]}}')
    lines = [f"curl -s {fleet.router_url}/v1/chat/completions "
             f"-H 'content-type: application/json' -d '{body}'"]
    if fleet.mqtt_url:
        login = device_login(fleet)
        lines.append(f"edgegen mqtt chat --broker {fleet.mqtt_url} 'Hello!'"
                     + (f" {shlex.join(login)}" if login else ""))
    lines.append(f"edgegen status --target local --consul {fleet.registry_url}")
    return lines


def run_fleet(opts: FleetOptions, console=None, demo: bool = False) -> None:
    """Start the fleet, print how to use it, then serve until Ctrl-C (or, with ``demo``,
    ask one question over REST and one over MQTT and stop: no "try it" for a fleet that
    is about to go)."""
    def _terminate(signum, frame):
        raise KeyboardInterrupt  # SIGTERM stops the fleet as cleanly as Ctrl-C

    def say(text: str) -> None:  # commands and answers: plain text, never rich markup
        if console:
            console.print(text, markup=False, soft_wrap=True)
        else:
            print(text)

    signal.signal(signal.SIGTERM, _terminate)
    fleet = start_fleet(opts, console)
    failed = False
    try:
        if demo:
            _demo(fleet, say)
            return
        say("\ntry it:")
        for line in try_it(fleet):
            say(f"  {line}")
        say("\nCtrl-C stops everything.")
        while True:
            dead = [n for n, p in fleet.procs if p.poll() is not None
                    and not n.endswith("bundle-pull")]
            if dead:
                raise LocalFleetError(f"{', '.join(dead)} exited; logs in {fleet.workdir}/logs")
            time.sleep(1)
    except KeyboardInterrupt:
        say("\nstopping ...")
    except BaseException:
        failed = True
        raise
    finally:
        fleet.stop(keep_logs=failed)


def _demo(fleet: Fleet, say: Callable[[str], None]) -> None:
    from manifests.demo import PROMPT, ask_mqtt, ask_rest, mqtt_chat_command

    say(f"\nQuestion: {PROMPT}")
    answer, node = ask_rest(fleet.router_url, fleet.bundle.name)
    say(f"REST answer (router → {node}): {answer}")
    if fleet.mqtt_url:
        login = device_login(fleet)
        say(f"MQTT question: "
            f"{shlex.join(['edgegen', *mqtt_chat_command(fleet.mqtt_url, *login)])}")
        say(f"MQTT answer: {ask_mqtt(fleet.mqtt_url, *login)}")
