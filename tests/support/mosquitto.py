"""A real Mosquitto broker for tests: a generated config, a free loopback port, optional
password file (mosquitto_passwd) and TLS (a throwaway CA made with openssl).

``Mosquitto(dir, locked=True)`` is the broker edgegen ships: its configuration, password file
and ACL rendered by the same code as the K3s manifests and `edgegen up`
(``manifests.render.mosquitto_conf``, ``edge_agent.mqtt.credentials``), with only the test's
logging added; ``creds`` holds the agents' and devices' passwords."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edge_agent.mqtt.contract import AGENT_USER, DEVICE_USER
from edge_agent.mqtt.credentials import BrokerCredentials, write_broker_credentials
from manifests.render import mosquitto_conf
from tests.support.procs import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def mosquitto_available() -> bool:
    return Path(MOSQUITTO).exists() and shutil.which("mosquitto_pub") is not None


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1/localhost, signed by it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = d / "ca.crt", d / "ca.key"
    cert, key, csr, ext = d / "server.crt", d / "server.key", d / "server.csr", d / "san.cnf"

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=edgegen test CA", "-keyout", str(ca_key), "-out", str(ca))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(key), "-out", str(csr))
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return TlsFiles(ca, cert, key)


class Mosquitto:
    """``mosquitto -c <generated conf>`` on 127.0.0.1:<free port>; persistence on, so that a
    restart keeps sessions (as a production broker would be set up)."""

    def __init__(self, directory: Path, *, users: dict[str, str] | None = None,
                 tls: TlsFiles | None = None, port: int | None = None, locked: bool = False,
                 anonymous: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.users = users
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.creds: BrokerCredentials | None = None
        self.conf = self.dir / "mosquitto.conf"
        if locked:
            self._write_locked(anonymous, users)
            return
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.dir}/",
            "log_dest stderr",
            "log_type all",
            "connection_messages true",
            "max_queued_messages 10000",
            # Small replies right after a PUBACK should not wait for a delayed ACK (Nagle).
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:   # otherwise mosquitto drops to user "mosquitto"
            lines.append(f"user {getpass.getuser()}")
        if users:
            pwfile = self.dir / "passwords"
            pwfile.write_text("")
            for name, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), name, password],
                               check=True, capture_output=True)
            pwfile.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
        self.conf.write_text("\n".join(lines) + "\n")

    def _write_locked(self, anonymous: bool, users: dict[str, str] | None) -> None:
        """edgegen's own broker configuration, plus logging for the tests to wait on."""
        self.creds = write_broker_credentials(self.dir / "mqtt", extra_users=users)
        conf = mosquitto_conf(self.port, f"{self.dir}/", host="127.0.0.1",
                              password_file=str(self.creds.passwd),
                              acl_file=str(self.creds.acl), allow_anonymous=anonymous,
                              user=getpass.getuser() if os.geteuid() == 0 else None)
        conf += "log_type all\nconnection_messages true\nmax_queued_messages 10000\n"
        if self.tls:
            conf += f"cafile {self.tls.ca}\ncertfile {self.tls.cert}\nkeyfile {self.tls.key}\n"
        self.conf.write_text(conf)

    def agent_login(self) -> dict:
        """AgentSettings fields of an agent of this (locked) broker."""
        return {"mqtt_username": AGENT_USER, "mqtt_password": self.creds.agent_password()}

    def device_login(self) -> dict:
        """MqttChatClient keywords of a device of this (locked) broker."""
        return {"username": DEVICE_USER, "password": self.creds.device_password()}

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def url_for(self, user: str, password: str) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}:{password}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Mosquitto":
        if not mosquitto_available():  # a missing broker fails the test; it is never skipped
            raise RuntimeError(f"{MOSQUITTO} or mosquitto_pub is missing: run scripts/install.sh "
                               "(Debian packages mosquitto, mosquitto-clients)")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n"
                                   + self.log())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"mosquitto not listening on {self.port} after {timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: mosquitto saves its persistence file (sessions, queued messages) and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
