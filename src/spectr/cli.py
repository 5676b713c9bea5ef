"""The `spectr` command line."""

from pathlib import Path

import typer

app = typer.Typer(help="spectr: exact speculative decoding with several drafts.", no_args_is_help=True)
study_app = typer.Typer(help="Measure something and publish it under docs/.", no_args_is_help=True)
app.add_typer(study_app, name="study")
bench_app = typer.Typer(help="Benchmarks, side by side with peers, on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _engine(target: str, draft: str, precision: str, compile: bool = False):
    import spectr

    typer.echo(f"loading {target} ...", err=True)
    engine = spectr.load(None if target == "default" else target, draft=draft, precision=precision, compile=compile)
    typer.echo(engine.describe(), err=True)
    return engine


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


TARGET = typer.Option("default", "--target", help="Target model folder or .gguf (default: SmolLM2-135M-Instruct).")
DRAFT = typer.Option("default", "--draft",
                     help="'default' (the shipped trained draft of the default target, else n-gram), 'ngram', "
                          "a trained draft folder, or a draft model folder / .gguf.")
PRECISION = typer.Option("bf16", "--precision", help="fp32, bf16, int8 or int4 (weights; activations bf16).")
COMPILE = typer.Option(False, "--compile", help="torch.compile the target (fp32/bf16; ~40 s per shape bucket).")
METHOD = typer.Option("spectr", "--method", help="ar (plain sampling), sd (one draft), spectr (k drafts).")
RULE = typer.Option(None, "--rule", help="standard, kseq, specinfer or rsd (default: standard for sd, kseq).")
K = typer.Option(2, "-k", help="Number of drafts.")
L = typer.Option(4, "-L", help="Tokens per draft.")
TEMPERATURE = typer.Option(1.0, "--temperature", help="0 = greedy.")
TOP_K = typer.Option(0, "--top-k", help="0 = off.")
TOP_P = typer.Option(1.0, "--top-p", help="1 = off.")
SEED = typer.Option(None, "--seed", help="Seed for a reproducible sample.")
MAX_NEW = typer.Option(128, "--max-new-tokens")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt (a user message with --chat)."),
    method: str = METHOD, rule: str | None = RULE, k: int = K, length: int = L,
    temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P, seed: int | None = SEED,
    max_new_tokens: int = MAX_NEW,
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    target: str = TARGET, draft: str = DRAFT, precision: str = PRECISION, compile: bool = COMPILE,
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
) -> None:
    """Sample a continuation exactly from the target, streaming it, then print a stats line."""
    import spectr
    from spectr.errors import SpectrError

    try:
        engine = _engine(target, draft, precision, compile)
        stats = None
        for chunk in spectr.stream(
            engine, prompt, method=method, rule=rule, k=k, L=length, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, max_new_tokens=max_new_tokens, stop=stop, chat=chat,
        ):
            typer.echo(chunk.text, nl=False)
            stats = chunk.stats
        typer.echo("")
        typer.echo(f"[{method}, k={k}, L={length}] {stats.summary()}", err=True)
    except SpectrError as error:
        _fail(error)


@app.command()
def chat(
    method: str = METHOD, rule: str | None = RULE, k: int = K, length: int = L,
    temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P, seed: int | None = SEED,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    target: str = TARGET, draft: str = DRAFT, precision: str = PRECISION,
) -> None:
    """An interactive chat with the target (chat template, history kept). Empty line or Ctrl-D ends it."""
    import spectr
    from spectr.errors import SpectrError

    try:
        engine = _engine(target, draft, precision)
    except SpectrError as error:
        _fail(error)
    messages: list[dict] = []
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        reply, stats = [], None
        typer.echo("bot> ", nl=False)
        try:
            for chunk in spectr.stream(
                engine, messages, method=method, rule=rule, k=k, L=length, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=None if seed is None else seed + turn,
                max_new_tokens=max_new_tokens, chat=True,
            ):
                typer.echo(chunk.text, nl=False)
                reply.append(chunk.text)
                stats = chunk.stats
        except SpectrError as error:
            typer.echo(f"\nerror: {error}", err=True)
            messages.pop()
            continue
        typer.echo("")
        typer.echo(f"[{stats.summary()}]", err=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1


@app.command()
def serve(
    target: str = TARGET, draft: str = DRAFT, precision: str = PRECISION,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_concurrency: int = typer.Option(2, "--max-concurrency", min=1, help="Generations running at once."),
    max_queue: int = typer.Option(8, "--max-queue", min=0, help="Requests waiting beyond those (then 429)."),
    api_key: str | None = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'."),
    model_name: str | None = typer.Option(None, "--model-name", help="The model id clients send."),
) -> None:
    """An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    import uvicorn

    import spectr
    from spectr.server import ServerSettings, create_app

    settings = ServerSettings(max_concurrency=max_concurrency, max_queue=max_queue, api_key=api_key,
                              model_name=model_name)
    app_ = create_app(
        lambda: spectr.load(None if target == "default" else target, draft=draft, precision=precision), settings
    )
    uvicorn.run(app_, host=host, port=port)


@app.command("train-draft")
def train_draft(
    output: Path = typer.Option(..., "--output", "-o", help="Folder of the draft (checkpoints go there too)."),
    target: str = TARGET,
    layers: int = typer.Option(2, "--layers", min=1, help="Decoder layers of the draft."),
    vocab: int = typer.Option(8192, "--vocab", min=16, help="Head rows kept (most frequent tokens)."),
    steps: int = typer.Option(1200, "--steps", min=1),
    batch: int = typer.Option(8, "--batch", min=1),
    sequence: int = typer.Option(256, "--sequence", min=8),
    learning_rate: float = typer.Option(1e-3, "--learning-rate"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=1),
    eval_tokens: int = typer.Option(8192, "--eval-tokens", min=8),
    train_tokens: int | None = typer.Option(None, "--train-tokens", help="Read at most this many corpus tokens."),
    resume: bool = typer.Option(True, help="Continue from the checkpoint in --output if there is one."),
) -> None:
    """Distil a small draft from the target on offline text (resumable; exports at every checkpoint)."""
    from rich.progress import Progress

    from spectr.errors import SpectrError
    from spectr.training.distill import DistillConfig, train

    config = DistillConfig(
        target=None if target == "default" else target, layers=layers, vocab=vocab, sequence=sequence,
        batch=batch, steps=steps, learning_rate=learning_rate, seed=seed, checkpoint_every=checkpoint_every,
        eval_tokens=eval_tokens, train_tokens_limit=train_tokens,
    )
    try:
        with Progress() as progress:
            task = progress.add_task("train-draft", total=steps)
            final = train(config, output, resume=resume, log=progress.console.print,
                          progress=lambda step, loss: progress.update(task, completed=step,
                                                                      description=f"loss {loss:.3f}"))
    except SpectrError as error:
        _fail(error)
    typer.echo(f"held-out acceptance {final['acceptance']:.4f} after {final['tokens']} tokens; draft in {output}")


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


@study_app.command("drafts")
def study_drafts(
    draft: str = typer.Option("default", "--draft",
                              help="The trained draft folder to measure (default: the one shipped, if any)."),
    output: Path = typer.Option(Path("docs/drafts.md"), "--output", "-o"),
    quick: bool = typer.Option(False, help="A tiny grid, for a smoke test."),
) -> None:
    """Acceptance and block efficiency of the drafts for the default target; writes docs/drafts.md."""
    import json

    from spectr.api import DEFAULT_DRAFT_NAME
    from spectr.studies import drafts

    folder = Path(__file__).parent / "drafts" / DEFAULT_DRAFT_NAME if draft == "default" else Path(draft)
    if not (folder / "draft.json").is_file():
        _fail(f"no trained draft at {folder}: make one with `spectr train-draft -o DIR`, then pass --draft DIR")
    reports, setup = drafts.run(str(folder), quick=quick, log=lambda message: typer.echo(message, err=True))
    manifest = json.loads((folder / "draft.json").read_text()) if (folder / "draft.json").is_file() else None
    text = drafts.render(reports, setup, manifest, "spectr study drafts" + (" --quick" if quick else ""))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    if manifest:
        drafts.plot_learning_curve(manifest, output.with_suffix(".png"))
    typer.echo(text)


@bench_app.command("forward")
def bench_forward(
    target: str = typer.Option("default", help="Model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    context: int = typer.Option(200, min=1, help="Cached tokens before the timed forward."),
    repeats: int = typer.Option(20, min=1, help="Interleaved repeats per backend (the minimum is reported)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the table to this Markdown file."),
    compile: bool = typer.Option(False, "--compile", help="Also time the torch.compile path (~90 s to compile)."),
) -> None:
    """Time one target forward over 1 and 16 new tokens for every backend and precision."""
    from rich.progress import track

    from spectr.bench import forward

    counts = (1, 16)
    steps = iter(track(range(repeats), description="bench forward", transient=True))
    next(steps, None)
    results = forward.run(target, context=context, new_token_counts=counts, repeats=repeats,
                          progress=lambda: next(steps, None), compile=compile)
    table = forward.render(results, context, counts, repeats)
    typer.echo(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(f"# Target forward cost\n\nProduced by `spectr bench forward`.\n\n{table}")


if __name__ == "__main__":
    app()
