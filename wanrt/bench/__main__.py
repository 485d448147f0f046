"""`python -m wanrt.bench --ckpt_dir ...`: the bench command on its own, same options as `wanrt bench`
(scripts in benchmarks/ use this form, so they do not depend on how wanrt/cli.py registers commands)."""

from __future__ import annotations

import typer

from wanrt.bench.cli import HELP, bench


def main() -> None:
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    app.command("bench", help=HELP)(bench)  # a single command: typer runs it without a subcommand name
    app()


if __name__ == "__main__":
    main()
