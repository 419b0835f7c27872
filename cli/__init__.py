"""edgegen command-line interface (Typer). Commands parse options and call library code."""
