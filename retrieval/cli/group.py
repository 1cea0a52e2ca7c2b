"""The `retrieval` command group: logging, one-line errors, and the commands of every group."""

from __future__ import annotations

import logging
import os
import signal
import threading
import traceback

import click

from ..errors import RetrievalError
from . import demo, index, search, train

DEBUG_ENV = "RETRIEVAL_DEBUG"  # set to 1: print the traceback behind a one-line error


class ErrorGroup(click.Group):
    """Turns the engine's errors into one line on stderr and exit status 1.

    With ``-v`` (or ``RETRIEVAL_DEBUG=1``) the traceback behind the line is printed first.
    """

    def invoke(self, ctx: click.Context):
        # `kill` (SIGTERM) unwinds like Ctrl-C: locks released, and a line saying so. Only the
        # main thread may set handlers; the caller's is put back (tests, notebooks).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
        try:
            return self._one_line_errors(ctx)
        except Exception as e:
            _tell_other_ranks(e)
            raise
        finally:
            if main and previous is not None:  # None: set outside Python (embedded)
                signal.signal(signal.SIGTERM, previous)

    def _one_line_errors(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (RetrievalError, ValueError, FileNotFoundError, FileExistsError) as e:
            _show_traceback(ctx, e)
            raise click.ClickException(str(e)) from None
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:  # a path given
            _show_traceback(ctx, e)
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            _show_traceback(ctx, e)
            raise click.ClickException(
                "interrupted: nothing half-written was published (build, add and train "
                "continue with --resume)"
            ) from None


def _tell_other_ranks(e: Exception) -> None:
    """Under torchrun, tell the other ranks this one failed, so they stop now rather than
    wait 30 minutes for it; where another rank failed first, its line replaces this one."""
    if isinstance(e, click.exceptions.Exit) or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from ..model import distributed  # torch: only when torchrun started this process

    line = e.format_message() if isinstance(e, click.ClickException) else str(e)
    first = distributed.announce(line)
    if not first.startswith(f"rank {os.environ.get('RANK', '?')} "):
        raise click.ClickException(f"stopped because {first}") from None


def _show_traceback(ctx: click.Context, e: BaseException) -> None:
    if ctx.params.get("verbose") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        click.echo("".join(traceback.format_exception(e)).rstrip(), err=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@click.group(cls=ErrorGroup)
@click.version_option(package_name="retrieval")
@click.option(
    "-v",
    "--verbose",
    count=True,
    help=f"More log output (-vv for debug) and the traceback behind an error (or {DEBUG_ENV}=1).",
)
def main(verbose: int) -> None:
    """Search images by text and text by image: train, build, search, measure."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # pymilvus logs each failed call with its traceback; the engine reports it in one line
    # (the traceback with -v).
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL if verbose < 2 else logging.DEBUG)


for _group in (index.commands, search.commands, train.commands, demo.commands):
    for _command in _group.commands.values():
        main.add_command(_command)
