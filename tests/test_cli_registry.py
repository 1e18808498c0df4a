"""The top-level command registry: summaries that match the commands, and a `--help` that imports no stage."""

from __future__ import annotations

import re
import subprocess
import sys

import click

from moesim.cli import COMMANDS, cli


def test_every_summary_opens_its_commands_own_help():
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    for name, (_, summary) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command is not None, name
        first_line = re.sub(r"\s*\([^)]*\)", "", (command.help or "").strip().splitlines()[0])
        assert first_line.startswith(summary.rstrip(".")), (name, summary, first_line)


def test_help_lists_every_command_without_importing_numpy_pyarrow_or_torch():
    probe = ("import sys\nfrom moesim.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in ('numpy', 'pyarrow', 'torch', 'simpy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout, res.stdout
    commands = res.stdout.split("\nCommands:\n", 1)[1]
    for name, (_, summary) in COMMANDS.items():
        # its own row of the Commands section: the name, then its summary
        row = rf"^ +{re.escape(name)} +{re.escape(summary.rstrip('.'))}"
        assert re.search(row, commands, re.M), (name, summary, commands)
