"""The `spectr` command line."""

from pathlib import Path

import typer

app = typer.Typer(help="spectr: exact speculative decoding with several drafts.", no_args_is_help=True)
study_app = typer.Typer(help="Measure something and publish it under docs/.", no_args_is_help=True)
app.add_typer(study_app, name="study")
bench_app = typer.Typer(help="Benchmarks, side by side with peers, on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


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


@bench_app.command("forward")
def bench_forward(
    target: str = typer.Option("default", help="Model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    context: int = typer.Option(200, min=1, help="Cached tokens before the timed forward."),
    repeats: int = typer.Option(20, min=1, help="Interleaved repeats per backend (the minimum is reported)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the table to this Markdown file."),
) -> None:
    """Time one target forward over 1 and 16 new tokens for every backend and precision."""
    from rich.progress import track

    from spectr.bench import forward

    counts = (1, 16)
    steps = iter(track(range(repeats), description="bench forward", transient=True))
    next(steps, None)
    results = forward.run(target, context=context, new_token_counts=counts, repeats=repeats,
                          progress=lambda: next(steps, None))
    table = forward.render(results, context, counts, repeats)
    typer.echo(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(f"# Target forward cost\n\nProduced by `spectr bench forward`.\n\n{table}")
