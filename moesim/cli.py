"""The ``moesim`` command.

Each stage owns its commands in its own ``cli`` module; this group only knows where they live, so a
stage's imports (torch, simpy, ...) load only when its command runs. A command whose module is not
installed is simply not listed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from moesim import __version__
from moesim.errors import MoesimError

# command name -> "module:attribute"; one registry for the whole CLI.
COMMANDS: dict[str, str] = {
    "trace": "moesim.tracer.cli:trace_group",
    "calib": "moesim.calib.cli:calib_command",
    "profiles": "moesim.calib.cli:profiles_command",
    "simulate": "moesim.simulator.cli:simulate_command",
    "sweep": "moesim.simulator.cli:sweep_command",
    "search": "moesim.costmodel.cli:search_command",
    "costmodel": "moesim.costmodel.cli:costmodel_group",
    "validate": "moesim.engine.cli:validate_command",
    "quality": "moesim.quality.cli:quality_command",
    "demo-model": "moesim.quality.cli:demo_model_command",
    "reproduce": "moesim.reproduce.cli:reproduce_command",
}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, target in COMMANDS.items() if _module_exists(target.split(":")[0]))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        if not _module_exists(module_name):
            return None
        module = importlib.import_module(module_name)
        return getattr(module, attr, None)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoesimError as exc:
            click.echo(f"moesim: error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moesim")
def cli() -> None:
    """Decide how to serve a Mixture-of-Experts LLM on hardware too small for it.

    Record routing traces (trace), measure hardware (calib), replay traces under offloading
    policies (simulate, sweep), search configurations with a fitted cost model (search), and check
    the simulator against a real offloading engine (validate).
    """


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="moesim")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
