"""`edgegen up` (placeholder until its issue lands: registers nothing)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `edgegen` app."""
