"""When the agent restarts itself with glibc's huge-page malloc, and when it must not."""

from __future__ import annotations

import sys

import pytest

from edge_agent import hugepages


def test_turned_off_or_already_set_means_no_restart(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("EDGEGEN_HUGEPAGES", "0")
    assert not hugepages.wanted()
    monkeypatch.delenv("EDGEGEN_HUGEPAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:" + hugepages.TUNABLE)
    assert not hugepages.wanted()


def test_thp_disabled_by_the_kernel_means_no_restart(monkeypatch, tmp_path):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("EDGEGEN_HUGEPAGES", raising=False)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "THP_SETTING", setting)
    assert not hugepages.wanted()
    setting.write_text("always [madvise] never\n")
    assert hugepages.wanted() == (sys.platform == "linux" and hugepages._glibc_235())


def test_a_process_that_is_not_the_agent_command_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest", "tests"])
    monkeypatch.setattr(sys, "argv", ["/venv/lib/pytest/__main__.py", "tests"])
    hugepages.reexec_with_hugepages()
    assert calls == []
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "cli.main", "agent", "--bundle", "b"])
    monkeypatch.setattr(sys, "argv", ["/repo/cli/main.py", "agent", "--bundle", "b"])
    monkeypatch.setattr(hugepages, "wanted", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    hugepages.reexec_with_hugepages()
    (path, argv, env), = calls
    assert argv == sys.orig_argv
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hugepages.TUNABLE


@pytest.mark.parametrize("argv, agent", [
    (["/venv/bin/edgegen", "agent", "--bundle", "b", "--node", "n"], True),
    (["/repo/cli/main.py", "agent", "--bundle", "b"], True),            # python -m cli.main
    (["cli/main.py", "agent"], True),                                   # python cli/main.py
    (["edgegen", "--debug", "--log-level", "info", "agent", "--bundle", "b"], True),
    (["edgegen", "--log-level=info", "agent"], True),
    (["edgegen", "export", "./agent-model"], False),
    (["edgegen", "export", "agent"], False),
    (["edgegen", "up", "--bundle", "/x/agent"], False),
    (["edgegen", "up", "--bundle", "agent"], False),
    (["edgegen", "--log-level", "agent", "up"], False),                 # a value, not a command
    (["edgegen", "agents"], False),
    (["edgegen", "--debug"], False),
    (["edgegen"], False),
    ([], False),
    (["/venv/bin/pytest", "-k", "agent"], False),                       # a test runner ...
    (["/venv/lib/pytest/__main__.py", "tests", "agent"], False),        # ... under -m pytest
    (["/srv/agent", "agent"], False),                                   # another program
    (["/repo/main.py", "agent"], False),
])
def test_only_the_agent_command_restarts(argv, agent):
    assert hugepages.started_as_agent(argv) is agent
