"""The wave plan of a fleet rollout, on tables of nodes and specs."""

import pytest

from manifests.waves import DEFAULT_WAVES, FleetNode, PlanError, parse_wave_spec, plan_waves


def fleet(n, groups="", offline=()):
    """``n`` nodes named n00, n01...; with ``groups``, node i is in groups[i % len]."""
    return [FleetNode(f"n{i:02}", groups[i % len(groups)] if groups else "",
                      online=f"n{i:02}" not in offline) for i in range(n)]


def sizes(waves):
    return [len(w.nodes) for w in waves]


SIZES = [
    # spec, fleet size, expected wave sizes
    (DEFAULT_WAVES, 1, [1]),
    (DEFAULT_WAVES, 2, [1, 1]),
    (DEFAULT_WAVES, 5, [1, 1, 1, 2]),          # 10% of 5 rounds up to the canary: +1 node
    (DEFAULT_WAVES, 10, [1, 1, 3, 5]),
    (DEFAULT_WAVES, 37, [1, 3, 15, 18]),       # ceil(3.7) = 4, ceil(18.5) = 19
    ("1", 10, [1, 9]),                         # a final 100% is appended
    ("1,3", 37, [1, 2, 34]),
    ("2,5%,100%", 37, [2, 1, 34]),             # ceil(1.85) = 2 is the canary: +1 node
    ("1,1,3", 10, [1, 2, 7]),                  # a count that moves nobody: dropped
    ("5,10%", 10, [5, 1, 4]),                  # a percentage below an earlier count: +1
    ("3,10", 5, [3, 2]),                       # a count beyond the fleet is the fleet
    ("25%,50%,75%,100%", 4, [1, 1, 1, 1]),
    ("12.5%,100%", 16, [2, 14]),
    ("100%", 5, [5]),
    (" 1 , 50% ", 4, [1, 1, 2]),
]


@pytest.mark.parametrize("spec, n, expected", SIZES, ids=[f"{s}|{n}" for s, n, _ in SIZES])
def test_wave_sizes(spec, n, expected):
    waves = plan_waves(fleet(n), spec)
    assert sizes(waves) == expected
    names = [name for w in waves for name in w.nodes]
    assert sorted(names) == [f"n{i:02}" for i in range(n)]   # each node once


def test_wave_names():
    assert [w.name for w in plan_waves(fleet(10))] == ["canary", "wave 2", "wave 3", "all"]
    assert [w.name for w in plan_waves(fleet(1))] == ["canary"]
    assert [w.name for w in plan_waves(fleet(2))] == ["canary", "all"]


def test_without_groups_waves_spread_over_groups():
    # 9 nodes in 3 groups: a = n00 n03 n06, b = n01 n04 n07, c = n02 n05 n08
    waves = plan_waves(fleet(9, "abc"), "1,4,100%")
    assert [w.nodes for w in waves] == [("n00",), ("n01", "n02", "n03"),
                                        ("n04", "n05", "n06", "n07", "n08")]


def test_without_groups_order_is_group_then_name_whatever_the_input_order():
    nodes = [FleetNode("z", "b"), FleetNode("y", "a"), FleetNode("x", "b"), FleetNode("w", "a")]
    assert [n for w in plan_waves(nodes, "1,2,100%") for n in w.nodes] == ["w", "x", "y", "z"]


def test_uneven_groups_stay_as_even_as_they_can():
    nodes = [FleetNode(f"a{i}", "a") for i in range(6)] + [FleetNode("b0", "b")]
    waves = plan_waves(nodes, "2,100%")
    assert waves[0].nodes == ("a0", "b0")
    assert waves[1].nodes == ("a1", "a2", "a3", "a4", "a5")


GROUPS = [
    # groups, spec, expected waves
    (["b", "a"], "1,50%,100%", [("n01",), ("n04", "n07", "n10"), ("n00", "n03", "n06", "n09")]),
    (["c"], "1,100%", [("n02",), ("n05", "n08", "n11")]),
    (["c", "c"], "1,100%", [("n02",), ("n05", "n08", "n11")]),   # listed twice: once
    ([], "1,100%", [("n00",), tuple(f"n{i:02}" for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11))]),
]


@pytest.mark.parametrize("groups, spec, expected", GROUPS, ids=[str(g) for g, _, _ in GROUPS])
def test_groups_go_one_after_another(groups, spec, expected):
    assert [w.nodes for w in plan_waves(fleet(12, "abc"), spec, groups=groups)] == expected


def test_unknown_group_names_it_and_the_known_ones():
    with pytest.raises(PlanError, match=r"unknown group 'x'.*'a', 'b', 'c'"):
        plan_waves(fleet(6, "abc"), groups=["a", "x"])


OFFLINE = [
    # fleet, groups, spec, expected canary wave
    (fleet(5, offline={"n00"}), None, DEFAULT_WAVES, ("n01",)),
    (fleet(5, offline={"n00", "n01"}), None, DEFAULT_WAVES, ("n02",)),
    (fleet(5, offline={"n00", "n02"}), None, "3,100%", ("n01", "n03", "n04")),
    (fleet(6, "ab", offline={"n00"}), ["a"], DEFAULT_WAVES, ("n02",)),
    (fleet(6, "ab", offline={"n00", "n02", "n04"}), ["a", "b"], DEFAULT_WAVES, ("n01",)),
    (fleet(3, offline={"n00", "n01", "n02"}), None, DEFAULT_WAVES, ("n00",)),   # none online
]


@pytest.mark.parametrize("nodes, groups, spec, canary", OFFLINE,
                         ids=[f"case{i}" for i in range(len(OFFLINE))])
def test_canary_is_online_when_a_node_is(nodes, groups, spec, canary):
    waves = plan_waves(nodes, spec, groups=groups)
    assert waves[0].nodes == canary
    rolled = [n for w in waves for n in w.nodes]
    assert len(rolled) == len(set(rolled))
    offline = {n.name for n in nodes if not n.online and (not groups or n.group in groups)}
    assert offline <= set(rolled)     # offline nodes are deferred at run time, not dropped


def test_offline_nodes_keep_their_place_after_the_canary():
    waves = plan_waves(fleet(5, offline={"n00"}), "1,2,100%")
    assert [w.nodes for w in waves] == [("n01",), ("n00",), ("n02", "n03", "n04")]


SPEC_ERRORS = [
    # spec, text the message must contain
    ("", "empty wave spec"),
    ("   ", "empty wave spec"),
    ("0", "'0'"),
    ("-1", "'-1'"),
    ("abc", "'abc'"),
    ("1.5", "'1.5'"),
    ("1,abc%", "'abc%'"),
    ("0%", "'0%'"),
    ("-10%", "'-10%'"),
    ("150%", "'150%'"),
    ("50%,10%", "'10%'"),
    ("5,3", "'3'"),
    ("1,,50%", "item 2 is empty"),
    ("1,50%,", "item 3 is empty"),
]


@pytest.mark.parametrize("spec, message", SPEC_ERRORS, ids=[repr(s) for s, _ in SPEC_ERRORS])
def test_bad_specs_name_the_bad_item(spec, message):
    with pytest.raises(PlanError) as err:
        parse_wave_spec(spec)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_spec_steps():
    steps = parse_wave_spec("2,10%")
    assert [(s.text, s.count, s.percent) for s in steps] == [("2", 2, None), ("10%", None, 10),
                                                              ("100%", None, 100)]
    assert [s.target(37) for s in steps] == [2, 4, 37]


def test_empty_fleet_is_an_error():
    with pytest.raises(PlanError, match="empty"):
        plan_waves([])


def test_duplicate_node_is_an_error():
    with pytest.raises(PlanError, match="'a' is listed twice"):
        plan_waves([FleetNode("a"), FleetNode("a", "g")])
