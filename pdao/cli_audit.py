"""`pdao audit …`: verify and export the hash-chained audit log (issue 5; being written)."""

from __future__ import annotations

import typer

audit_app = typer.Typer(help="The audit log: verify, export.", no_args_is_help=True)
