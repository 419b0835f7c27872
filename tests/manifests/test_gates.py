"""Health gates: Prometheus text, windows, p95 as Prometheus computes it, and the decision."""

import math

import pytest

from edge_agent.metrics import AgentMetrics
from manifests.gates import (
    DEFAULT_GATES, FAIL, PASS, PENDING, Figures, Gate, GateError, MetricsError, MetricsSnapshot,
    combine, decide, histogram_quantile, parse_gates, parse_metrics, window,
)

INF = math.inf


def exposition(chat_ok, chat_503, compl_ok, compl_400, embed_500, buckets, ttft_sum, tokens,
               created=1.7e9):
    """An agent's /metrics as generate_latest writes it (TTFT buckets: 0.1, 0.25, 0.5, 1, +Inf)."""
    b = dict(zip(("0.1", "0.25", "0.5", "1.0", "+Inf"), buckets))
    return f"""\
# HELP edgegen_requests_total Requests answered, by endpoint and HTTP status.
# TYPE edgegen_requests_total counter
edgegen_requests_total{{endpoint="/v1/chat/completions",status="200"}} {chat_ok}
edgegen_requests_total{{endpoint="/v1/chat/completions",status="503"}} {chat_503}
edgegen_requests_total{{endpoint="/v1/completions",status="200"}} {compl_ok}
edgegen_requests_total{{endpoint="/v1/completions",status="400"}} {compl_400}
edgegen_requests_total{{endpoint="/v1/embeddings",status="500"}} {embed_500}
# HELP edgegen_requests_created Requests answered, by endpoint and HTTP status.
# TYPE edgegen_requests_created gauge
edgegen_requests_created{{endpoint="/v1/chat/completions",status="200"}} 1.7e9
# HELP edgegen_time_to_first_token_seconds Time from a generation request to its first token.
# TYPE edgegen_time_to_first_token_seconds histogram
""" + "".join(f'edgegen_time_to_first_token_seconds_bucket{{le="{le}"}} {n}\n'
              for le, n in b.items()) + f"""\
edgegen_time_to_first_token_seconds_count {b["+Inf"]}
edgegen_time_to_first_token_seconds_sum {ttft_sum}
# HELP edgegen_generated_tokens_total Completion tokens generated.
# TYPE edgegen_generated_tokens_total counter
edgegen_generated_tokens_total {tokens}
# HELP edgegen_generated_tokens_created Completion tokens generated.
# TYPE edgegen_generated_tokens_created gauge
edgegen_generated_tokens_created {created}
# HELP edgegen_queue_depth Requests waiting for a decoding slot.
# TYPE edgegen_queue_depth gauge
edgegen_queue_depth 3.0
"""


BEFORE = exposition(90.0, 2.0, 6.0, 2.0, 7.0, (10, 50, 80, 95, 100), 30.5, 12000.0)
AFTER = exposition(180.0, 12.0, 6.0, 12.0, 20.0, (30, 90, 150, 205, 212), 70.0, 17500.0)


def test_parse_a_realistic_exposition():
    s = parse_metrics(BEFORE)
    assert s.requests == 100          # chat + completions, any status; embeddings not counted
    assert s.failed == 2              # the 503; the 400 is the client's
    assert s.ttft_buckets == ((0.1, 10), (0.25, 50), (0.5, 80), (1.0, 95), (INF, 100))
    assert (s.ttft_count, s.ttft_sum, s.generated_tokens, s.started) == (100, 30.5, 12000, 1.7e9)


def test_window_between_two_scrapes():
    f = window(parse_metrics(BEFORE), parse_metrics(AFTER), 60)
    assert (f.requests, f.errors) == (110, 10)
    assert f.error_rate == pytest.approx(10 / 110)
    assert f.ttft_buckets == ((0.1, 20), (0.25, 40), (0.5, 70), (1.0, 110), (INF, 112))
    # rank 0.95 * 112 = 106.4 falls in (0.5, 1]: 0.5 + 0.5 * (106.4 - 70) / (110 - 70)
    assert f.ttft_p95 == pytest.approx(0.955)
    assert f.tokens_per_s == pytest.approx(5500 / 60)


def test_the_agents_own_metrics_parse():
    m = AgentMetrics()
    m.requests.labels("/v1/chat/completions", "200").inc(9)
    m.requests.labels("/v1/completions", "500").inc(1)
    for v in (0.02, 0.04, 0.2, 0.3, 3.0):
        m.ttft.observe(v)
    m.generated_tokens.inc(250)
    s = parse_metrics(m.render().decode())
    assert (s.requests, s.failed, s.ttft_count, s.generated_tokens) == (10, 1, 5, 250)
    assert s.ttft_buckets[-1] == (INF, 5) and s.started > 0
    f = window(MetricsSnapshot(started=s.started), s, 10)
    assert f.ttft_p95 == pytest.approx(4.375)   # rank 4.75 in (2.5, 5]: 2.5 + 2.5 * 0.75 / 1


def test_missing_metrics_are_zeros():
    s = parse_metrics("# TYPE other_total counter\nother_total 4.0\n")
    assert s == MetricsSnapshot()
    f = window(s, s, 30)
    assert (f.requests, f.error_rate, f.ttft_p95, f.tokens_per_s) == (0, 0, None, 0)


def test_text_that_is_not_an_exposition():
    with pytest.raises(MetricsError):
        parse_metrics("this is { not prometheus")


def snap(requests=100.0, failed=2.0, buckets=((0.5, 80.0), (INF, 100.0)), tokens=1000.0,
         started=1.0):
    return MetricsSnapshot(requests, failed, buckets, buckets[-1][1] if buckets else 0.0, 0.0,
                           tokens, started)


RESETS = [
    # name, before, after, expected (requests, errors, tokens)
    ("no reset", snap(), snap(150, 3, ((0.5, 120), (INF, 150)), 1600), (50, 1, 600)),
    ("requests went down", snap(), snap(30, 1, ((0.5, 20), (INF, 30)), 1200), (30, 1, 1200)),
    ("tokens went down", snap(), snap(120, 2, ((0.5, 90), (INF, 120)), 400), (120, 2, 400)),
    ("restarted and overtook", snap(), snap(150, 3, ((0.5, 120), (INF, 150)), 1600, started=9.0),
     (150, 3, 1600)),
    ("bucket layout changed", snap(), snap(150, 3, ((1.0, 120), (INF, 150)), 1600),
     (150, 3, 1600)),
    ("first scrape had nothing", MetricsSnapshot(), snap(), (100, 2, 1000)),
]


@pytest.mark.parametrize("name, before, after, expected", RESETS, ids=[r[0] for r in RESETS])
def test_counter_resets(name, before, after, expected):
    f = window(before, after, 10)
    assert (f.requests, f.errors, f.tokens) == expected
    assert f.ttft_buckets[-1][1] == expected[0]


def test_window_must_last():
    with pytest.raises(ValueError):
        window(snap(), snap(), 0)


QUANTILES = [
    # name, q, buckets, expected
    ("middle bucket", 0.95, ((0.1, 20), (0.25, 40), (0.5, 70), (1.0, 110), (INF, 112)), 0.955),
    ("rank on a bound", 0.95, ((0.1, 10), (0.25, 50), (0.5, 80), (1.0, 95), (INF, 100)), 1.0),
    ("median", 0.5, ((0.1, 10), (0.25, 50), (0.5, 80), (1.0, 95), (INF, 100)), 0.25),
    ("first bucket starts at 0", 0.95, ((0.5, 10), (1.0, 10), (INF, 10)), 0.475),
    ("rank in +Inf: highest finite bound", 0.95, ((0.5, 1), (1.0, 2), (INF, 10)), 1.0),
    ("forced monotonic", 0.4, ((0.1, 5), (0.2, 3), (INF, 10)), 0.08),
    ("non-positive first bound", 0.2, ((-1.0, 5), (0.0, 10), (INF, 10)), -1.0),
    ("no observations", 0.95, ((0.1, 0), (INF, 0)), None),
    ("no +Inf bucket", 0.95, ((0.1, 1), (0.2, 2)), None),
    ("only +Inf", 0.95, ((INF, 5),), None),
    ("nothing", 0.95, (), None),
]


@pytest.mark.parametrize("name, q, buckets, expected", QUANTILES, ids=[c[0] for c in QUANTILES])
def test_histogram_quantile_as_prometheus(name, q, buckets, expected):
    got = histogram_quantile(q, buckets)
    assert got == (None if expected is None else pytest.approx(expected))


def test_combine_sums_counts_and_buckets():
    a = window(snap(0, 0, ((0.25, 0), (0.5, 0), (INF, 0)), 0),
               snap(10, 1, ((0.25, 9), (0.5, 10), (INF, 10)), 600), 60)
    b = window(snap(0, 0, ((0.25, 0), (0.5, 0), (INF, 0)), 0),
               snap(30, 0, ((0.25, 0), (0.5, 20), (INF, 30)), 1800), 60)
    f = combine([a, b])
    assert (f.nodes, f.requests, f.errors, f.seconds) == (2, 40, 1, 120)
    assert f.error_rate == pytest.approx(1 / 40)
    assert f.tokens_per_s == pytest.approx(20)        # per node: 2400 tokens / 120 node-s
    assert f.ttft_buckets == ((0.25, 9), (0.5, 30), (INF, 40))
    assert f.ttft_p95 == 0.5                          # rank 38 falls in +Inf
    assert a.ttft_p95 == pytest.approx(0.25 + 0.25 * 0.5 / 1)   # rank 9.5 in (0.25, 0.5]


def test_combine_keeps_the_bounds_all_nodes_share():
    a = Figures(10, ttft_buckets=((0.1, 5), (0.5, 8), (INF, 10)))
    b = Figures(10, ttft_buckets=((0.25, 6), (0.5, 9), (INF, 10)))
    assert combine([a, b]).ttft_buckets == ((0.5, 17), (INF, 20))
    assert combine([a, Figures()]).ttft_buckets == a.ttft_buckets   # a node with no data


def test_combine_nothing_is_no_data():
    f = combine([])
    assert (f.nodes, f.requests, f.ttft_p95, f.tokens_per_s) == (0, 0, None, 0)


def test_parse_default_gates():
    gates = parse_gates(DEFAULT_GATES)
    assert [g.text for g in gates] == ["error_rate<=0.05", "ttft_p95<=2x", "tokens_per_s>=0.5x"]
    assert gates[1] == Gate("ttft_p95", "<=", 2.0, relative=True)
    assert parse_gates(" error_rate < 0.1 ,tokens_per_s>2X") == [
        Gate("error_rate", "<", 0.1), Gate("tokens_per_s", ">", 2.0, True)]


GATE_ERRORS = [
    # expression, text the message must contain
    ("", "no gates"),
    ("  ", "no gates"),
    ("latency<=1", "unknown metric 'latency'"),
    ("<=1", "unknown metric ''"),
    ("error_rate=<0.1", "bad operator '=<'"),
    ("error_rate==0.1", "bad operator '=='"),
    ("error_rate 0.1", "bad operator ''"),
    ("error_rate<=abc", "bad limit 'abc'"),
    ("error_rate<=", "bad limit ''"),
    ("ttft_p95<=-1", "bad limit '-1'"),
    ("ttft_p95<=nan", "bad limit 'nan'"),
    ("ttft_p95<=1.5y", "bad limit '1.5y'"),
    ("error_rate<=0.1,,ttft_p95<=2x", "gate 2 is empty"),
    ("error_rate<=0.1,", "gate 2 is empty"),
]


@pytest.mark.parametrize("expr, message", GATE_ERRORS, ids=[repr(e) for e, _ in GATE_ERRORS])
def test_gate_errors_name_the_bad_part(expr, message):
    with pytest.raises(GateError) as err:
        parse_gates(expr)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def fig(requests=100, error_rate=0.0, ttft=0.3, tps=50.0):
    return Figures(requests, error_rate, ttft, tps, errors=requests * error_rate)


BASE = fig(ttft=0.31, tps=50.0)

DECISIONS = [
    # name, gates, canary, baseline, state, failed gates, skipped count
    ("absolute pass", "error_rate<=0.02", fig(error_rate=0.01), None, PASS, (), 0),
    ("<= holds on equal", "error_rate<=0.02", fig(error_rate=0.02), None, PASS, (), 0),
    ("<= broken", "error_rate<=0.02", fig(error_rate=0.03), None, FAIL, ("error_rate<=0.02",), 0),
    ("< broken on equal", "error_rate<0.02", fig(error_rate=0.02), None, FAIL,
     ("error_rate<0.02",), 0),
    (">= holds on equal", "tokens_per_s>=20", fig(tps=20), None, PASS, (), 0),
    (">= broken", "tokens_per_s>=20", fig(tps=19), None, FAIL, ("tokens_per_s>=20",), 0),
    ("> broken on equal", "tokens_per_s>20", fig(tps=20), None, FAIL, ("tokens_per_s>20",), 0),
    ("absolute ttft", "ttft_p95<0.5", fig(ttft=0.4), None, PASS, (), 0),
    ("relative ttft broken", "ttft_p95<=1.5x", fig(ttft=0.84), BASE, FAIL, ("ttft_p95<=1.5x",), 0),
    ("relative ttft holds", "ttft_p95<=1.5x", fig(ttft=0.4), BASE, PASS, (), 0),
    ("relative tokens broken", "tokens_per_s>=0.7x", fig(tps=30), BASE, FAIL,
     ("tokens_per_s>=0.7x",), 0),
    ("relative tokens holds", "tokens_per_s>=0.7x", fig(tps=36), BASE, PASS, (), 0),
    ("relative error rate", "error_rate<=2x", fig(error_rate=0.05), fig(error_rate=0.02), FAIL,
     ("error_rate<=2x",), 0),
    ("defaults, all well", DEFAULT_GATES, fig(), BASE, PASS, (), 0),
    ("defaults, several broken", DEFAULT_GATES, fig(error_rate=0.1, ttft=0.7, tps=10), BASE,
     FAIL, ("error_rate<=0.05", "ttft_p95<=2x", "tokens_per_s>=0.5x"), 0),
    ("no baseline: relative skipped", DEFAULT_GATES, fig(ttft=9), None, PASS, (), 2),
    ("no baseline: absolute still holds", DEFAULT_GATES, fig(error_rate=0.5), None, FAIL,
     ("error_rate<=0.05",), 2),
    ("baseline too small", "ttft_p95<=2x", fig(ttft=9), fig(requests=3), PASS, (), 1),
    ("baseline without ttft", "ttft_p95<=2x", fig(ttft=9), fig(ttft=None), PASS, (), 1),
    ("too few canary requests", DEFAULT_GATES, fig(requests=4, error_rate=1), BASE, PENDING,
     (), 0),
    ("canary without ttft", "ttft_p95<=2x", fig(ttft=None), BASE, PENDING, (), 0),
    ("canary without ttft but failing", DEFAULT_GATES, fig(error_rate=1, ttft=None), BASE,
     FAIL, ("error_rate<=0.05",), 0),
    ("canary without ttft, no ttft gate", "error_rate<=0.05", fig(ttft=None), BASE, PASS, (), 0),
]


@pytest.mark.parametrize("name, expr, canary, baseline, state, failed, skipped", DECISIONS,
                         ids=[d[0] for d in DECISIONS])
def test_decide(name, expr, canary, baseline, state, failed, skipped):
    d = decide(parse_gates(expr), canary, baseline)
    assert d.state == state, d.summary()
    assert tuple(text for text, _, _ in d.failures) == failed
    assert len(d.skipped) == skipped
    assert len(d.reasons) == (len(failed) if state == FAIL else state == PENDING)


def test_a_failure_explains_itself_in_one_line():
    d = decide(parse_gates("ttft_p95<=1.5x, error_rate<=0.02"), fig(ttft=0.84, error_rate=0.05),
               BASE)
    assert d.failures == (("ttft_p95<=1.5x", 0.84, pytest.approx(0.465)),
                          ("error_rate<=0.02", 0.05, 0.02))
    assert d.reasons == ("ttft_p95 0.84 s > 1.5x baseline 0.31 s = 0.465 s",
                         "error_rate 0.05 > 0.02")
    assert d.summary().startswith("fail: 100 requests, error_rate 0.05, ttft_p95 0.84 s")
    assert d.figures["baseline"]["ttft_p95"] == 0.31


def test_pending_and_skips_say_why():
    d = decide(parse_gates(DEFAULT_GATES), fig(requests=3), None)
    assert d.summary() == ("pending: 3 requests, error_rate 0, ttft_p95 0.3 s, tokens_per_s "
                           "50 tok/s; the canary answered 3 generation requests, 5 are "
                           "needed to judge")
    d = decide(parse_gates(DEFAULT_GATES), fig(), None)
    none = "skipped: no baseline (no node left on the old bundle)"
    assert d.skipped == (f"ttft_p95<=2x {none}", f"tokens_per_s>=0.5x {none}")
    assert "baseline" not in d.figures
    d = decide(parse_gates("ttft_p95<=2x"), fig(requests=3), fig(), min_requests=3)
    assert d.state == PASS
