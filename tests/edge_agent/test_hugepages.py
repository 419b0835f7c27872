"""When the agent restarts itself with glibc's huge-page malloc, and when it must not."""

from __future__ import annotations

import sys

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
    hugepages.reexec_with_hugepages()
    assert calls == []
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "cli.main", "agent", "--bundle", "b"])
    monkeypatch.setattr(hugepages, "wanted", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    hugepages.reexec_with_hugepages()
    (path, argv, env), = calls
    assert argv == sys.orig_argv
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hugepages.TUNABLE
