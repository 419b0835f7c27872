"""Service and check definitions as Consul's agent API receives them, parsed and validated.

Consul decodes request bodies case-insensitively and accepts snake_case aliases
(``DeregisterCriticalServiceAfter`` = ``deregister_critical_service_after``); py-consul sends
lower-case keys, curl users send CamelCase. ``_norm`` folds both onto one spelling for the
struct fields only: ``Meta`` keys are user data and are kept exactly as sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cloud_router.errors import InvalidRequest

STATUSES = ("passing", "warning", "critical")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float, what: str = "duration") -> float:
    """A Go duration ("10s", "1m30s", "500ms", "0") in seconds; bare numbers are nanoseconds,
    as Go's time.Duration decodes them."""
    if isinstance(text, bool):
        raise InvalidRequest(f"invalid {what}: {text!r}")
    if isinstance(text, (int, float)):
        return float(text) * 1e-9
    if not isinstance(text, str):
        raise InvalidRequest(f"invalid {what}: {text!r}")
    s = text.strip()
    if s in ("", "0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise InvalidRequest(f"invalid {what}: time: invalid duration {text!r}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Seconds as Go prints a time.Duration ("2s", "1m0s", "500ms")."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = f"{s:g}s"
    if m or h:
        out = f"{int(m)}m" + out
    if h:
        out = f"{int(h)}h" + out
    return out


def _norm(obj: dict) -> dict:
    return {k.replace("_", "").lower(): v for k, v in obj.items()} if isinstance(obj, dict) else {}


def _str(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"Request decode failed: {what} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class CheckDefinition:
    check_id: str
    name: str
    service_id: str
    kind: str                         # "http" | "ttl"
    http: str = ""
    method: str = "GET"
    header: dict = field(default_factory=dict)
    interval: float = 0.0
    timeout: float = 10.0             # Consul's default HTTP check timeout
    ttl: float = 0.0
    deregister_after: float = 0.0     # DeregisterCriticalServiceAfter; 0 = never
    notes: str = ""
    status: str = "critical"          # initial status (Consul's default is critical)
    tls_skip_verify: bool = False

    def definition_json(self) -> dict:
        return {
            "Interval": format_duration(self.interval),
            "Timeout": format_duration(self.timeout if self.kind == "http" else 0.0),
            "DeregisterCriticalServiceAfter": format_duration(self.deregister_after),
            "HTTP": self.http,
            "Header": self.header or None,
            "Method": self.method if self.kind == "http" else "",
            "Body": "",
            "TLSServerName": "",
            "TLSSkipVerify": self.tls_skip_verify,
            "TCP": "",
        }


@dataclass(frozen=True)
class ServiceDefinition:
    id: str
    name: str
    address: str = ""
    port: int = 0
    tags: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    weights: dict = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    tagged_addresses: dict = field(default_factory=dict)
    checks: tuple[CheckDefinition, ...] = ()


def parse_check(raw: dict, *, service_id: str, service_name: str, check_id: str) -> CheckDefinition:
    """One entry of ``Check``/``Checks``; HTTP and TTL checks are what this registry runs."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"Request decode failed: a check must be an object, got {raw!r}")
    c = _norm(raw)
    cid = _str(c.get("checkid") or c.get("id"), "CheckID") or check_id
    name = _str(c.get("name"), "Name") or f"Service '{service_name}' check"
    status = _str(c.get("status"), "Status") or "critical"
    if status not in STATUSES:
        raise InvalidRequest(f"Invalid check status: {status!r}")
    common = dict(
        check_id=cid, name=name, service_id=service_id, notes=_str(c.get("notes"), "Notes"),
        status=status,
        deregister_after=parse_duration(c.get("deregistercriticalserviceafter") or "0",
                                        "DeregisterCriticalServiceAfter"),
    )
    unsupported = [k for k in ("args", "scriptargs", "tcp", "grpc", "h2ping", "dockercontainerid",
                               "aliasservice", "aliasnode", "udp", "osservice") if c.get(k)]
    if unsupported:
        raise InvalidRequest(
            f"Check {cid!r}: the edgegen registry runs HTTP and TTL checks only "
            f"(got {', '.join(unsupported)})"
        )
    if c.get("ttl"):
        ttl = parse_duration(c["ttl"], "TTL")
        if ttl <= 0:
            raise InvalidRequest(f"Check {cid!r} is not valid: TTL must be > 0 for TTL checks")
        return CheckDefinition(kind="ttl", ttl=ttl, **common)
    if c.get("http"):
        url = _str(c["http"], "HTTP")
        if not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"Check {cid!r} is not valid: HTTP must be an http(s) URL")
        interval = parse_duration(c.get("interval") or "0", "Interval")
        if interval <= 0:
            raise InvalidRequest(
                f"Check {cid!r} is not valid: Interval must be > 0 for HTTP checks"
            )
        timeout = parse_duration(c.get("timeout") or "10s", "Timeout")
        header = c.get("header") or {}
        if not isinstance(header, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header.values()
        ):
            raise InvalidRequest("Request decode failed: Header must map names to lists of strings")
        return CheckDefinition(
            kind="http", http=url, method=_str(c.get("method"), "Method") or "GET",
            header=header, interval=interval, timeout=timeout if timeout > 0 else 10.0,
            tls_skip_verify=bool(c.get("tlsskipverify")), **common,
        )
    raise InvalidRequest(f"Check {cid!r} is not valid: it needs HTTP with Interval, or TTL")


def parse_service(body: object) -> ServiceDefinition:
    """The body of ``PUT /v1/agent/service/register``; InvalidRequest names what is wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest("Request decode failed: the body must be a JSON object")
    s = _norm(body)
    name = _str(s.get("name"), "Name")
    if not name:
        raise InvalidRequest("Missing service name")
    sid = _str(s.get("id"), "ID") or name
    port = s.get("port", 0) or 0
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidRequest(f"Request decode failed: Port must be an integer 0-65535, got {port!r}")
    tags = s.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidRequest("Request decode failed: Tags must be a list of strings")
    meta = s.get("meta") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidRequest("Invalid Service Meta: values must be strings")
    weights = _norm(s.get("weights") or {})
    w = {"Passing": weights.get("passing", 1), "Warning": weights.get("warning", 1)}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in w.values()):
        raise InvalidRequest("Invalid Weights: Passing and Warning must be non-negative integers")
    if w["Passing"] < 1:
        raise InvalidRequest("Invalid Weights: Passing must be greater than 0")
    raw_checks: list = []
    if s.get("check"):
        raw_checks.append(s["check"])
    extra = s.get("checks") or []
    if not isinstance(extra, list):
        raise InvalidRequest("Request decode failed: Checks must be a list")
    raw_checks.extend(extra)
    checks = []
    for i, rc in enumerate(raw_checks, start=1):
        default_id = f"service:{sid}" if len(raw_checks) == 1 else f"service:{sid}:{i}"
        checks.append(parse_check(rc, service_id=sid, service_name=name, check_id=default_id))
    if len({c.check_id for c in checks}) != len(checks):
        raise InvalidRequest("Invalid check: duplicate CheckID")
    tagged = s.get("taggedaddresses") or {}
    if not isinstance(tagged, dict):
        raise InvalidRequest("Request decode failed: TaggedAddresses must be an object")
    return ServiceDefinition(
        id=sid, name=name, address=_str(s.get("address"), "Address"), port=port,
        tags=tuple(tags), meta=dict(meta), weights=w,
        enable_tag_override=bool(s.get("enabletagoverride")), tagged_addresses=tagged,
        checks=tuple(checks),
    )
