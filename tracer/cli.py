"""`moesim trace`: record routing from a Hugging Face MoE model; `trace import` and `trace stats` below it."""

from __future__ import annotations

import click


@click.group(name="trace", invoke_without_command=True)
@click.pass_context
def trace_group(ctx: click.Context) -> None:
    """Record routing traces (`moesim trace --prompts P --model M`), import them, and summarise them."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _register_subcommands() -> None:
    from moesim.tracer.importers import import_command
    from moesim.tracer.stats import stats_command

    trace_group.add_command(import_command, name="import")
    trace_group.add_command(stats_command, name="stats")


try:
    _register_subcommands()
except ImportError:  # a stage module not written yet
    pass
