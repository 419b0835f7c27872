"""`edgegen up --demo`: one chat request through the router (REST), one over MQTT."""

from __future__ import annotations

import subprocess
import sys

import httpx

from manifests.errors import LocalFleetError

PROMPT = "In one sentence, what is edge computing?"


def ask_rest(router_url: str, model: str, timeout: float = 300.0) -> tuple[str, str]:
    """The answer and the node that gave it."""
    try:
        r = httpx.post(f"{router_url}/v1/chat/completions", timeout=timeout, json={
            "model": model, "max_tokens": 48, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPT}]})
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise LocalFleetError(f"the router did not answer the demo request: {exc}") from exc
    return r.json()["choices"][0]["message"]["content"], r.headers.get("x-edgegen-node", "?")


def mqtt_chat_command(broker: str, *login: str) -> list[str]:
    """The `edgegen` arguments of the MQTT question (printed by the demo as it asks it);
    ``login``: the device's user and password-file options."""
    return ["mqtt", "chat", "--broker", broker, *login, "--max-tokens", "48", "--temperature",
            "0", "--no-stream", PROMPT]


def ask_mqtt(broker: str, *login: str, timeout: float = 300.0) -> str:
    """Ask any agent on the broker, as a device would, with `edgegen mqtt chat`."""
    cmd = [sys.executable, "-m", "cli.main", *mqtt_chat_command(broker, *login)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LocalFleetError("no MQTT answer in time") from exc
    if r.returncode != 0:
        raise LocalFleetError(f"the MQTT demo request failed: {r.stderr.strip()[-500:]}")
    return r.stdout.strip()
