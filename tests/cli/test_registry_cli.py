"""`edgegen registry`."""

from __future__ import annotations


def test_cli_help_names_the_options():
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["registry", "--help"])
    assert result.exit_code == 0
    for option in ("--port", "--host", "--data-dir"):
        assert option in result.output
