"""The `s3d` command group.

Sub-commands are imported only when used, so `s3d --help` and `s3d --version` stay fast (torch is
slow to import) and a broken optional command cannot take the others down.
"""

from __future__ import annotations

import importlib
import sys

import click

from s3d import __version__
from s3d.errors import S3DError, one_line
from s3d.messages import library_messages

# name -> (module, attribute, one-line help shown by `s3d --help` without importing the module)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "preprocess": ("s3d.cli.preprocess", "preprocess", "Validate a dataset, crop, normalise and resample it."),
    "pretrain": ("s3d.cli.pretrain", "pretrain", "Self-supervised pre-training (S3D MAE, SimTROT, B-TROT)."),
    "finetune": ("s3d.cli.finetune", "finetune", "Train a segmentation network, from scratch or pre-trained."),
    "predict": ("s3d.cli.predict", "predict", "Segment a folder of images with a trained model."),
    "evaluate": ("s3d.cli.evaluate", "evaluate", "Dice, NSD and HD95 of predictions against references."),
    "weights": ("s3d.cli.weights", "weights", "List, inspect, download and export pre-trained weights."),
    "demo": ("s3d.cli.demo", "demo", "Fine-tune and score on real MRIs shipped with s3d (minutes, CPU)."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class UserError(click.ClickException):
    """Printed as one line, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        click.echo(f"s3d: error: {one_line(self.format_message())}", err=True)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="s3d")
def cli() -> None:
    """s3d: self-supervised pre-training and fine-tuning of 3D segmentation networks.

    Typical use: `s3d finetune DATASET RUN` then `s3d predict -i IMAGES -o OUT -m RUN`.
    Run `s3d COMMAND --help` for the options of each command.
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `s3d` script: user errors become one line and exit code 2."""
    with library_messages():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="s3d", standalone_mode=False)
        _leave_process_group()
        if isinstance(rv, int) and rv != 0:  # ctx.exit(n) returns n when standalone_mode is off
            sys.exit(rv)
    except S3DError as e:
        UserError(str(e)).show()
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # one line like every other error, with where to read more, instead of click's three-line usage
        where = f"`{e.ctx.command_path} --help`" if e.ctx is not None else "`s3d --help`"
        click.echo(f"s3d: error: {one_line(e.format_message())} (see {where})", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


def _leave_process_group() -> None:
    """Under torchrun, leave the process group cleanly (only if torch was imported at all)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
