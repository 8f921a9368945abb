"""`pdao policy …`: the rule table and "who may do what"."""

from __future__ import annotations

import typer

policy_app = typer.Typer(help="Authorization: the rule table and decisions.", no_args_is_help=True)
