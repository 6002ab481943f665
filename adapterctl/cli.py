"""The `adapters` command line: a click group per noun; project errors become one line and an exit code here."""

from __future__ import annotations

from typing import Any

import click

from adapterctl.registry.commands import COMMANDS
from adapterctl.core.errors import AdaptersError
from adapterctl.serve.cli import serve, tenants, ui
from adapterctl.train.cli import evaluate, models, train


class _Cli(click.Group):
    """Runs a subcommand and turns any AdaptersError into 'Error: ...' on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdaptersError as exc:
            click.secho(f"Error: {exc}", err=True, fg="red")
            ctx.exit(exc.exit_code)
        except OSError as exc:  # a file the command needs cannot be read or written: permissions, a full disk
            where = f"{exc.filename}: " if exc.filename else ""
            click.secho(f"Error: {where}{exc.strerror or exc}.", err=True, fg="red")
            ctx.exit(5)
        except KeyboardInterrupt:  # what a command had begun was undone on the way out, as for any error
            click.secho("Interrupted.", err=True, fg="red")
            ctx.exit(130)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterctl")
def main() -> None:
    """Train, version and serve LoRA adapters for large language models."""


main.add_command(train)
main.add_command(models)
main.add_command(evaluate)
main.add_command(serve)
main.add_command(tenants)
main.add_command(ui)
for command in COMMANDS:
    main.add_command(command)

# The manual's page for each command, shown at the foot of its --help (the registry's commands: docs/registry.md).
MANUAL = {
    "train": "training",
    "models": "training",
    "eval": "precision",
    "serve": "serving",
    "tenants": "tenants",
    "ui": "console",
    "hub": "hub",
}


def _point_at_the_manual(command: click.Command, page: str) -> None:
    """End COMMAND's help, and its subcommands', with the docs page that covers it."""
    command.epilog = f"Manual: docs/{page}.md"
    for name, sub in getattr(command, "commands", {}).items():
        _point_at_the_manual(sub, MANUAL.get(name, "registry") if command is main else page)


_point_at_the_manual(main, "index")


if __name__ == "__main__":
    main()
