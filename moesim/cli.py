"""The ``moesim`` command.

Each stage owns its commands in its own ``cli`` module; this group only knows where they live, so a
stage's imports (torch, simpy, ...) load only when its command runs. A command whose module is not
installed is simply not listed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import click

from moesim import __version__
from moesim.errors import MoesimError

# command name -> ("module:attribute", summary); one registry for the whole CLI. The summary is what
# `moesim --help` lists, so listing the commands imports none of their modules (numpy, pyarrow, torch);
# a test checks that each summary opens its command's own help text.
COMMANDS: dict[str, tuple[str, str]] = {
    "trace": ("moesim.tracer.cli:trace_group", "Record routing traces, import them, and summarise them."),
    "calib": ("moesim.calib.cli:calib_command", "Measure this machine and write a hardware profile."),
    "profiles": ("moesim.calib.cli:profiles_command", "List the bundled hardware profiles."),
    "simulate": ("moesim.simulator.cli:simulate_command", "Replay a routing trace under one offloading policy."),
    "sweep": ("moesim.costmodel.cli:sweep_command", "Simulate a grid of policies x traces x profiles x cache sizes."),
    "search": ("moesim.costmodel.cli:search_command", "Find the best configuration for a trace on a profile."),
    "costmodel": ("moesim.costmodel.cli:costmodel_group", "Fit, inspect and query the cost model."),
    "validate": ("moesim.engine.cli:validate_command",
                 "Simulate a configuration, run it on the real offloading engine."),
    "quality": ("moesim.quality.cli:quality_command", "Perplexity of a model with its experts quantized."),
    "demo-model": ("moesim.quality.cli:demo_model_command", "Train a small Mixtral-architecture MoE."),
    "doctor": ("moesim.doctor:doctor_command", "Print library versions, CUDA and NVML status."),
    "reproduce": ("moesim.reproduce.cli:reproduce_command",
                  "Simulate every published point with its preset and machine."),
}


def _module_exists(module: str) -> bool:
    """Whether ``module`` is installed, without running its package's ``__init__`` (which imports numpy)."""
    package, _, leaf = module.rpartition(".")
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(Path(folder, f"{leaf}.py").is_file() or Path(folder, leaf, "__init__.py").is_file()
               for folder in spec.submodule_search_locations)


# the flags that name what a command writes; every other existing file on the command line is an input
OUTPUT_FLAGS = ("--out", "--json", "--timeline", "--report", "--plot")


def _named_input_files(argv) -> list[str]:
    """The existing files the command line names, other than the values of :data:`OUTPUT_FLAGS` (an output
    may replace a file of its own, e.g. a trace it resumes, but never one the command reads)."""
    files, after_output_flag = [], False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if after_output_flag:
            after_output_flag = False
            continue
        if arg in OUTPUT_FLAGS:
            after_output_flag = True
            continue
        if eq and flag in OUTPUT_FLAGS:
            continue
        candidate = value if eq and flag.startswith("--") else arg
        if candidate and candidate != "-" and Path(candidate).is_file():
            files.append(candidate)
    return files


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (target, _) in COMMANDS.items() if _module_exists(target.split(":")[0]))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name][0].split(":")
        if not _module_exists(module_name):
            return None
        module = importlib.import_module(module_name)
        return getattr(module, attr, None)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["moesim.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        from moesim.atomic import note_input, tracking_inputs

        try:
            with tracking_inputs():
                for path in _named_input_files(ctx.meta.get("moesim.argv", ())):
                    note_input(path)
                return super().invoke(ctx)
        except MoesimError as exc:
            click.echo(f"moesim: error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            # the same one-line shape as every other user mistake; the help is one command away
            where = exc.ctx.command_path if exc.ctx is not None else "moesim"
            click.echo(f"moesim: error: {exc.format_message()} (see {where} --help)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            # every long command keeps what it finished (and says so where it can resume)
            click.echo("moesim: interrupted", err=True)
            ctx.exit(130)


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
