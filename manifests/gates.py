"""Health gates on the agents' own metrics, pure: Prometheus text in, pass, fail or pending out.

A wave is promoted only when the nodes already on the new bundle (the canary) look as healthy
as the gates ask, over a window between two scrapes of each agent's ``/metrics``. The runner
scrapes and waits; this module reads text and compares numbers, so tests feed it tables.

    parse_metrics(text) -> MetricsSnapshot        one scrape of one agent
    window(before, after, seconds) -> Figures     what that agent did between two scrapes
    combine([figures, ...]) -> Figures            several nodes as one (canary, baseline)
    decide(parse_gates(expr), canary, baseline) -> GateDecision
"""

from __future__ import annotations

import math
import operator
import re
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

from prometheus_client.parser import text_string_to_metric_families

# Defaults. The error rate is absolute: the baseline's is usually 0, and any multiple of 0
# fails on the first error; 5% lets a canary's stray failure pass but not a broken bundle.
# Latency and throughput depend on this fleet's hardware and load, which the baseline shares,
# so they are relative: 2x TTFT leaves room for a cold prefix cache, 0.5x tokens/s still
# catches a bundle that fell onto a slow path (CPU fallback, wrong precision).
DEFAULT_GATES = "error_rate<=0.05, ttft_p95<=2x, tokens_per_s>=0.5x"
GENERATION_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
METRICS = ("error_rate", "ttft_p95", "tokens_per_s")
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_BROKEN = {"<=": ">", ">=": "<", "<": ">=", ">": "<="}    # how a failure reads
_UNITS = {"error_rate": "", "ttft_p95": " s", "tokens_per_s": " tok/s"}
_TTFT = "edgegen_time_to_first_token_seconds"
_PLAIN = {_TTFT + "_count": "ttft_count", _TTFT + "_sum": "ttft_sum",
          "edgegen_generated_tokens_total": "generated_tokens",
          "edgegen_generated_tokens_created": "started"}
PASS, FAIL, PENDING = "pass", "fail", "pending"

Buckets = tuple[tuple[float, float], ...]    # (le, cumulative count), by le, +Inf last


class GateError(ValueError):
    """A gate expression cannot be read; the message names the bad part."""


class MetricsError(ValueError):
    """A scrape is not Prometheus text exposition."""


@dataclass(frozen=True)
class MetricsSnapshot:
    """One scrape of one agent: the counters the gates need, zero when absent."""

    requests: float = 0.0           # generation requests answered, any status
    failed: float = 0.0             # of which status >= 500 (a 4xx is the client's fault)
    ttft_buckets: Buckets = ()
    ttft_count: float = 0.0
    ttft_sum: float = 0.0
    generated_tokens: float = 0.0
    started: float = 0.0            # edgegen_generated_tokens_created: changes on restart


@dataclass(frozen=True)
class Figures:
    """What one node, or several combined, did over a window."""

    requests: float = 0.0
    error_rate: float = 0.0
    ttft_p95: float | None = None   # seconds; None without observations
    tokens_per_s: float = 0.0       # per node: tokens / node-seconds
    errors: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0            # node-seconds once combined
    ttft_buckets: Buckets = ()      # bucket deltas, kept so that nodes can be combined
    nodes: int = 1


@dataclass(frozen=True)
class Gate:
    metric: str                     # one of METRICS
    op: str                         # one of OPS
    limit: float                    # absolute, or a multiple of the baseline when relative
    relative: bool = False

    @property
    def text(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}{'x' if self.relative else ''}"


@dataclass(frozen=True)
class GateDecision:
    state: str                                       # pass | fail | pending
    failures: tuple[tuple[str, float, float], ...]   # (gate text, canary value, limit)
    figures: dict[str, dict[str, float | None]]      # {"canary": {...}, "baseline": {...}}
    reasons: tuple[str, ...] = ()   # one line per failure, or why it is pending
    skipped: tuple[str, ...] = ()   # relative gates with nothing to compare to, and why

    def summary(self) -> str:
        c = self.figures["canary"]
        seen = ", ".join([f"{c['requests']:g} requests"]
                         + [f"{m} {_fmt(m, c[m])}" for m in METRICS])
        return "; ".join((f"{self.state}: {seen}",) + self.reasons + self.skipped)


def parse_metrics(text: str) -> MetricsSnapshot:
    """Read an agent's ``/metrics`` text; only generation endpoints count as requests."""
    try:
        return snapshot((s.name, s.labels, s.value)
                        for family in text_string_to_metric_families(text)
                        for s in family.samples)
    except ValueError as exc:
        raise MetricsError(f"not Prometheus text exposition: {exc}") from exc


def snapshot(samples) -> MetricsSnapshot:
    """One agent's counters from its samples, ``(name, labels, value)`` each: a scrape's, or
    a Prometheus query's (``manifests.fleet_metrics``)."""
    got = dict.fromkeys(("requests", "failed", *_PLAIN.values()), 0.0)
    buckets: dict[float, float] = {}
    for name, labels, value in samples:
        if name in _PLAIN:
            got[_PLAIN[name]] = value
        elif name == _TTFT + "_bucket" and "le" in labels:
            le = float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + value
        elif name == "edgegen_requests_total" and labels.get("endpoint") in GENERATION_ENDPOINTS:
            status = labels.get("status", "")
            got["requests"] += value
            got["failed"] += value if status.isdigit() and int(status) >= 500 else 0.0
    return MetricsSnapshot(ttft_buckets=tuple(sorted(buckets.items())), **got)


# The series ``snapshot`` reads, as one PromQL name matcher.
SERIES = "|".join(("edgegen_requests_total", _TTFT + "_bucket", *_PLAIN))


def window(before: MetricsSnapshot, after: MetricsSnapshot, seconds: float) -> Figures:
    """What one agent did between two scrapes ``seconds`` apart.

    After a restart ``after`` is the whole delta, as in Prometheus ``increase()``. It is
    decided once per agent, not per series: a restart resets every counter together, and
    mixing counts from before and after it could report more failures than requests.
    """
    if seconds <= 0:
        raise ValueError(f"a window must last more than 0 seconds, not {seconds}")
    if _restarted(before, after):
        before = MetricsSnapshot()
    old = dict(before.ttft_buckets)
    deltas = tuple((le, n - old.get(le, 0.0)) for le, n in after.ttft_buckets)
    return _figures(after.requests - before.requests, after.failed - before.failed,
                    after.generated_tokens - before.generated_tokens, seconds, deltas, 1)


def _restarted(b: MetricsSnapshot, a: MetricsSnapshot) -> bool:
    """Another start time, other buckets (another agent version) or any counter gone down."""
    b_les, a_les = [le for le, _ in b.ttft_buckets], [le for le, _ in a.ttft_buckets]
    pairs = [(b.requests, a.requests), (b.failed, a.failed), (b.ttft_count, a.ttft_count),
             (b.generated_tokens, a.generated_tokens),
             *zip((n for _, n in b.ttft_buckets), (n for _, n in a.ttft_buckets))]
    return bool(b.started and a.started and b.started != a.started
                or b_les and b_les != a_les or any(y < x for x, y in pairs))


def combine(figures: list[Figures]) -> Figures:
    """Several nodes as one: counts add up, p95 comes from the summed bucket deltas (over the
    bucket bounds all nodes share), and tokens/s stays per node, so that a canary of one node
    compares with a baseline of nine. No figures give an empty Figures (no data)."""
    layouts = [dict(f.ttft_buckets) for f in figures if f.ttft_buckets]
    common = set.intersection(*map(set, layouts)) if layouts else set()
    buckets = tuple((le, sum(layout[le] for layout in layouts)) for le in sorted(common))
    return _figures(sum(f.requests for f in figures), sum(f.errors for f in figures),
                    sum(f.tokens for f in figures), sum(f.seconds for f in figures), buckets,
                    sum(f.nodes for f in figures))


def _figures(requests: float, errors: float, tokens: float, seconds: float,
             buckets: Buckets, nodes: int) -> Figures:
    return Figures(requests, errors / requests if requests else 0.0,
                   histogram_quantile(0.95, buckets), tokens / seconds if seconds else 0.0,
                   errors, tokens, seconds, buckets, nodes)


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of cumulative buckets, as Prometheus ``histogram_quantile`` computes it:
    linear inside the bucket that holds the rank, the lowest bucket starting at 0, and the
    highest finite bound when the rank falls in +Inf. None where Prometheus gives NaN."""
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return None
    bounds = [le for le, _ in buckets]
    counts = list(accumulate((n for _, n in buckets), max))   # forced monotonic, as there
    if counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    b = bisect_left(counts, rank, hi=len(counts) - 1)
    if b == len(buckets) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start, below = (bounds[b - 1], counts[b - 1]) if b > 0 else (0.0, 0.0)
    return start + (bounds[b] - start) * (rank - below) / (counts[b] - below)


_GATE = re.compile(r"\s*([^<>=!\s]*)\s*([<>=!]*)\s*(.*?)\s*")


def parse_gates(expr: str) -> list[Gate]:
    """Read ``"error_rate<=0.02, ttft_p95<=1.5x"``: a number is absolute (a rate, seconds,
    tokens/s), a number with ``x`` a multiple of the baseline's figure."""
    if not (expr or "").strip():
        raise GateError("no gates given: expected e.g. 'error_rate<=0.02, ttft_p95<=1.5x'")
    gates = []
    for pos, part in enumerate(expr.split(","), 1):
        if not part.strip():
            raise GateError(f"gates {expr!r}: gate {pos} is empty")
        metric, op, number = _GATE.fullmatch(part).groups()
        where = f"gate {part.strip()!r}"
        if metric not in METRICS:
            raise GateError(f"{where}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
        if op not in OPS:
            raise GateError(f"{where}: bad operator {op!r}; use <=, >=, < or >")
        relative = number[-1:] in ("x", "X")
        try:
            limit = float(number[:-1] if relative else number)
        except ValueError:
            limit = math.nan
        if not (math.isfinite(limit) and limit >= 0):
            raise GateError(f"{where}: bad limit {number!r}; expected a number >= 0, or a "
                            "multiple of the baseline like '1.5x'")
        gates.append(Gate(metric, op, limit, relative))
    return gates


def decide(gates: list[Gate], canary: Figures, baseline: Figures | None, *,
           min_requests: int = 5) -> GateDecision:
    """Judge the canary: fail when any gate is broken, else pending when a figure is not known
    yet, else pass.

    Fewer than ``min_requests`` canary requests is pending: noise is not evidence. A relative
    gate needs a baseline (the nodes still on the old bundle) with ``min_requests`` and that
    figure; without one it is skipped, and says so, rather than failed: the last wave has no
    baseline, and the absolute gates still hold there.
    """
    figures = {"canary": _display(canary)}
    if baseline is not None:
        figures["baseline"] = _display(baseline)
    if canary.requests < min_requests:
        why = (f"the canary answered {canary.requests:g} generation requests, "
               f"{min_requests} are needed to judge")
        return GateDecision(PENDING, (), figures, (why,))
    failures, lines, waiting, skipped = [], [], [], []
    for gate in gates:
        value = getattr(canary, gate.metric)
        if value is None:
            waiting.append(f"{gate.metric} unknown: the canary's {canary.requests:g} "
                           "requests recorded no first token")
            continue
        limit, via = gate.limit, ""
        if gate.relative:
            base, why = _baseline(gate.metric, baseline, min_requests)
            if base is None:
                skipped.append(f"{gate.text} skipped: {why}")
                continue
            limit = gate.limit * base
            via = f"{gate.limit:g}x baseline {_fmt(gate.metric, base)} = "
        if not OPS[gate.op](value, limit):
            failures.append((gate.text, value, limit))
            lines.append(f"{gate.metric} {_fmt(gate.metric, value)} {_BROKEN[gate.op]} "
                         f"{via}{_fmt(gate.metric, limit)}")
    state = FAIL if failures else PENDING if waiting else PASS
    return GateDecision(state, tuple(failures), figures, tuple(lines or waiting),
                        tuple(skipped))


def _baseline(metric: str, baseline: Figures | None,
              min_requests: int) -> tuple[float | None, str]:
    if baseline is None:
        return None, "no baseline (no node left on the old bundle)"
    if baseline.requests < min_requests:
        return None, (f"the baseline answered {baseline.requests:g} requests, "
                      f"{min_requests} are needed")
    value = getattr(baseline, metric)
    return (None, f"the baseline has no {metric}") if value is None else (value, "")


def _display(f: Figures) -> dict[str, float | None]:
    return {key: getattr(f, key) for key in ("nodes", "requests", *METRICS)}


def _fmt(metric: str, value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}{_UNITS[metric]}"
