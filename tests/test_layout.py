"""The layout stays readable: no module of the agent or the router grows past 400 lines
(split it by job instead, as the packages are split)."""

from tests.support.procs import REPO

MAX_LINES = 400


def test_no_agent_or_router_module_over_400_lines():
    too_long = {}
    for package in ("edge_agent", "cloud_router"):
        for path in (REPO / package).rglob("*.py"):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                too_long[str(path.relative_to(REPO))] = lines
    assert too_long == {}
