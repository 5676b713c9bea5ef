"""The `spectr` command line."""

from pathlib import Path

import typer

app = typer.Typer(help="spectr: exact speculative decoding with several drafts.", no_args_is_help=True)
study_app = typer.Typer(help="Measure something and publish it under docs/.", no_args_is_help=True)
app.add_typer(study_app, name="study")


@app.command()
def version() -> None:
    """Print spectr's version."""
    from spectr import __version__

    typer.echo(__version__)


@study_app.command("rules")
def study_rules(
    output: Path = typer.Option(Path("docs/rules.md"), "--output", "-o", help="Markdown file to write."),
    quick: bool = typer.Option(False, help="A tiny grid, for a smoke test."),
) -> None:
    """Acceptance of every exact rule relative to α*, and K-SEQ's cost at real vocabulary sizes."""
    from spectr.studies import rules

    typer.echo(rules.main(output=output, quick=quick, command="spectr study rules"))
