"""Credentials of an edge broker: random passwords, Mosquitto's hashed password file, the ACL
file, and reading a password back from a file.

`edgegen up` and `edgegen mqtt credentials` (the K3s Secret) write them with
``write_broker_credentials``; the tests start Mosquitto with the same files. Every file is
created mode 0600 before a byte is written. Passwords are hashed by ``mosquitto_passwd -U``,
which reads them from the file, so no password is ever on a command line (``ps`` shows argv
to every user of the machine).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import MqttConfigError
from edge_agent.mqtt.contract import AGENT_USER, DEVICE_USER, broker_acl

PASSWORD_ENV = "EDGEGEN_MQTT_PASSWORD"
PASSWD_FILE = "passwd"                    # Mosquitto's password_file (hashed)
ACL_FILE = "acl"                          # Mosquitto's acl_file (``contract.broker_acl``)
AGENT_PASSWORD_FILE = "agent.password"    # the agents' password, in clear
DEVICE_PASSWORD_FILE = "device.password"  # the devices' password, in clear


@dataclass(frozen=True)
class BrokerCredentials:
    """The files of one broker's credentials, all in ``directory``."""

    directory: Path

    @property
    def passwd(self) -> Path:
        return self.directory / PASSWD_FILE

    @property
    def acl(self) -> Path:
        return self.directory / ACL_FILE

    @property
    def agent_password_file(self) -> Path:
        return self.directory / AGENT_PASSWORD_FILE

    @property
    def device_password_file(self) -> Path:
        return self.directory / DEVICE_PASSWORD_FILE

    def agent_password(self) -> str:
        return read_password_file(self.agent_password_file)

    def device_password(self) -> str:
        return read_password_file(self.device_password_file)


def new_password() -> str:
    """A random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner may read (0600, also if it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def find_mosquitto_passwd() -> str:
    path = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if os.path.exists("/usr/bin/mosquitto_passwd") else None)
    if not path:
        raise MqttConfigError("mosquitto_passwd is not installed: `sudo apt-get install "
                              "mosquitto` (Debian/Ubuntu) or `brew install mosquitto` (macOS)")
    return path


def hash_password_file(path: Path, users: Mapping[str, str]) -> None:
    """Write Mosquitto's password file for ``users`` (name -> password), hashed in place by
    ``mosquitto_passwd -U`` (PBKDF2-SHA512)."""
    for name in users:
        if not name or ":" in name or "\n" in name:
            raise MqttConfigError(f"MQTT user name {name!r} cannot be in a password file")
    write_private(path, "".join(f"{name}:{password}\n" for name, password in users.items()))
    r = subprocess.run([find_mosquitto_passwd(), "-U", str(path)], capture_output=True,
                       text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise MqttConfigError(f"mosquitto_passwd could not hash {path}: "
                              f"{(r.stderr or r.stdout).strip()}")
    os.chmod(path, 0o600)


def write_broker_credentials(directory: str | Path, *,
                             extra_users: Mapping[str, str] | None = None) -> BrokerCredentials:
    """New random passwords for the agents' and the devices' users, Mosquitto's hashed
    password file and the ACL file, in ``directory`` (created 0700). ``extra_users`` adds
    users (name -> password) to the password file, e.g. one per device."""
    creds = BrokerCredentials(Path(directory))
    creds.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    agent, device = new_password(), new_password()
    write_private(creds.agent_password_file, agent + "\n")
    write_private(creds.device_password_file, device + "\n")
    hash_password_file(creds.passwd, {AGENT_USER: agent, DEVICE_USER: device,
                                      **(extra_users or {})})
    write_private(creds.acl, broker_acl())
    return creds


def read_password_file(path: str | Path) -> str:
    """The password in a file: its text without the line end (one line)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MqttConfigError(f"cannot read the MQTT password file {path}: {exc}") from exc
    password = text.removesuffix("\n").removesuffix("\r")
    if not password or "\n" in password:
        raise MqttConfigError(f"the MQTT password file {path} must hold one non-empty line")
    return password


def resolve_password(password_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The MQTT password a command was given: ``--mqtt-password-file`` if set, else
    ``$EDGEGEN_MQTT_PASSWORD``, else None (the broker URL's own, if any)."""
    if password_file:
        return read_password_file(password_file)
    return environ.get(PASSWORD_ENV) or None


def device_instructions(creds: BrokerCredentials, broker_url: str | None = None) -> list[str]:
    """How a device connects to a broker with these credentials (printed by `edgegen up` and
    `edgegen mqtt credentials`)."""
    broker = broker_url or "mqtt://<edge node>:1883"
    return [
        f"devices log in as {DEVICE_USER} with the password in {creds.device_password_file}",
        ("a device reads its replies on edgegen/v1/reply/<its client id> only (MQTT v5 "
         "Response Topic or 3.1.1 reply_to; no '+', '#'; not 'chat')"),
        (f"edgegen mqtt chat --broker {broker} --mqtt-username {DEVICE_USER} "
         f"--mqtt-password-file {creds.device_password_file} 'Hello!'"),
    ]
