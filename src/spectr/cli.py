"""The `spectr` command line."""

from pathlib import Path

import typer

from spectr.precisions import DEFAULT_PRECISION
from spectr.settings import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE

app = typer.Typer(help="spectr: exact speculative decoding with several drafts.", no_args_is_help=True)
study_app = typer.Typer(help="Measure something and publish it under docs/.", no_args_is_help=True)
app.add_typer(study_app, name="study")
bench_app = typer.Typer(help="Benchmarks, side by side with peers, on this machine.")
app.add_typer(bench_app, name="bench")


def _engine(target: str, draft: str, precision: str, compile: bool = False, approximate: str | None = None):
    import spectr

    typer.echo(f"loading {target} ...", err=True)
    engine = spectr.load(None if target == "default" else target, draft=draft, precision=precision, compile=compile,
                         approximate=approximate)
    typer.echo(engine.describe(), err=True)
    return engine


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


TARGET = typer.Option("default", "--target", help="Target model folder or .gguf (default: SmolLM2-135M-Instruct).")
DRAFT = typer.Option("default", "--draft",
                     help="'default' (the shipped trained draft of the default target, else n-gram), 'ngram', "
                          "a trained draft folder, a draft model folder / .gguf, or the target itself, cheaper (no "
                          "training, any model spectr runs): 'self-skip' (its middle third of layers skipped) or "
                          "'self-skip:8-21'; 'sparq' (SparQ attention over the older context, for long prompts) or "
                          "'sparq:<rank>,<keep>'; or both joined by '+'.")
APPROXIMATE = typer.Option(None, "--approximate",
                           help="'sparq' or 'sparq:<rank>,<keep>': an APPROXIMATE mode, SparQ attention in the "
                                "target's own decoding passes (faster at long contexts, NOT the target's exact "
                                "law; the exact use of SparQ is --draft sparq).")
PRECISION = typer.Option(DEFAULT_PRECISION, "--precision",
                         help="native (the file's own quantization), fp32, bf16, int8 or int4 (re-quantized).")
COMPILE = typer.Option(False, "--compile", help="torch.compile the target (fp32/bf16; ~40 s per shape bucket).")
METHOD = typer.Option("spectr", "--method", help="ar (plain sampling), sd (one draft), spectr (k drafts).")
RULE = typer.Option(None, "--rule", help="standard, kseq, specinfer, rsd, block or importance (default: block "
                                          "for the auto tree, standard for sd, kseq).")
K = typer.Option(None, "-k", help="Number of drafts (iid) or expansions a level (dynamic); giving k or L fixes "
                                  "the shape (default: auto).")
L = typer.Option(None, "-L", help="Tokens per draft (iid), levels (dynamic), the longest path (auto; default 6).")
TREE = typer.Option(None, "--tree", help="auto (default: one path a step, its length chosen from this machine's "
                                         "measured costs and the acceptance so far), iid (k drafts of L tokens), "
                                         "dynamic (the --budget nodes the draft is surest of) or greedy (k − 1 "
                                         "likeliest tokens and one drawn from the rest, L levels).")
BUDGET = typer.Option(None, "--budget", min=1, help="Nodes of a dynamic tree (default k·L).")
TEMPERATURE = typer.Option(DEFAULT_TEMPERATURE, "--temperature", help="0 = greedy.")
PRESENCE = typer.Option(0.0, "--presence-penalty", help="Subtracted from the logit of every token generated so far.")
FREQUENCY = typer.Option(0.0, "--frequency-penalty", help="Subtracted once for each time a token was generated.")
REPETITION = typer.Option(1.0, "--repetition-penalty",
                          help="Tokens of the text, prompt too: logits > 0 divided by it, < 0 multiplied (1 = off).")
TOP_K = typer.Option(0, "--top-k", help="0 = off.")
TOP_P = typer.Option(1.0, "--top-p", help="1 = off.")
SEED = typer.Option(None, "--seed", help="Seed for a reproducible sample.")
MAX_NEW = typer.Option(DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt (a user message with --chat)."),
    method: str = METHOD, rule: str | None = RULE, k: int | None = K, length: int | None = L,
    tree: str | None = TREE, budget: int | None = BUDGET,
    temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P, seed: int | None = SEED,
    presence_penalty: float = PRESENCE, frequency_penalty: float = FREQUENCY, repetition_penalty: float = REPETITION,
    max_new_tokens: int = MAX_NEW,
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    target: str = TARGET, draft: str = DRAFT, precision: str = PRECISION, compile: bool = COMPILE,
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    approximate: str | None = APPROXIMATE,
) -> None:
    """Sample a continuation exactly from the target (unless --approximate), streaming it, then print a
    stats line."""
    import spectr
    from spectr.errors import SpectrError

    from spectr.settings import GenerationSettings

    try:
        settings = GenerationSettings.build(
            method=method, rule=rule, k=k, L=length, tree=tree, budget=budget, temperature=temperature, top_k=top_k,
            top_p=top_p, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty, seed=seed, max_new_tokens=max_new_tokens, stop=stop)
        engine = _engine(target, draft, precision, compile, approximate)
        stats = None
        for chunk in spectr.stream(engine, prompt, settings, chat=chat):
            typer.echo(chunk.text, nl=False)
            stats = chunk.stats
        typer.echo("")
        label = settings.label() + (", APPROXIMATE (SparQ attention)" if engine.approximate else "")
        typer.echo(f"[{label}] {stats.summary()}", err=True)
    except SpectrError as error:
        _fail(error)


@app.command()
def chat(
    method: str = METHOD, rule: str | None = RULE, k: int | None = K, length: int | None = L,
    tree: str | None = TREE, budget: int | None = BUDGET,
    temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P, seed: int | None = SEED,
    presence_penalty: float = PRESENCE, frequency_penalty: float = FREQUENCY, repetition_penalty: float = REPETITION,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    target: str = TARGET, draft: str = DRAFT, precision: str = PRECISION,
) -> None:
    """An interactive chat with the target (chat template, history kept). Empty line or Ctrl-D ends it."""
    from dataclasses import replace

    import spectr
    from spectr.errors import SpectrError
    from spectr.settings import GenerationSettings

    try:
        settings = GenerationSettings.build(
            method=method, rule=rule, k=k, L=length, tree=tree, budget=budget, temperature=temperature, top_k=top_k,
            top_p=top_p, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty, seed=seed, max_new_tokens=max_new_tokens)
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
            turn_settings = replace(settings, seed=None if seed is None else seed + turn)
            for chunk in spectr.stream(engine, messages, turn_settings, chat=True):
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
    max_concurrency: int = typer.Option(8, "--max-concurrency", min=1, help="Generations running at once (with "
                                        "batching, sharing each target pass)."),
    max_queue: int = typer.Option(8, "--max-queue", min=0, help="Requests waiting beyond those (then 429)."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Generations share target passes "
                                  "(continuous batching); off: each decodes alone."),
    api_key: str | None = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY'."),
    model_name: str | None = typer.Option(None, "--model-name", help="The model id clients send."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Replicas behind Ray Serve's router (needs "
                                 "spectr[ray]); 1: this process alone."),
    autoscale_to: int | None = typer.Option(None, "--autoscale-to", min=1,
                                            help="With --replicas: let Ray Serve scale up to this many."),
) -> None:
    """An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    import spectr
    from spectr.server import ServerSettings, create_app

    settings = ServerSettings(max_concurrency=max_concurrency, max_queue=max_queue, api_key=api_key,
                              model_name=model_name, batching=batching)

    def load_engine():
        return spectr.load(None if target == "default" else target, draft=draft, precision=precision)

    if replicas > 1 or autoscale_to:
        from spectr.errors import SpectrError
        from spectr.server import ray as ray_serve

        try:
            ray_serve.run(load_engine, settings, host, port, replicas, autoscale_to)
        except SpectrError as error:
            _fail(error)
        return
    import uvicorn

    uvicorn.run(create_app(load_engine, settings), host=host, port=port)


@app.command("train-draft")
def train_draft(
    output: Path = typer.Option(..., "--output", "-o", help="Folder of the draft (checkpoints too)."),
    target: str = TARGET,
    kind: str = typer.Option("eagle", "--kind", help="eagle: a head over the target's features (default); "
                             "standalone: a few-layer model."),
    samples: Path | None = typer.Option(None, "--samples", help="eagle: folder of the target's samples "
                                        "(default OUTPUT/samples; share one between runs)."),
    sample_tokens: int | None = typer.Option(None, "--sample-tokens", min=1,
                                             help="eagle: sampled tokens to store before training (default 5M)."),
    rows: int | None = typer.Option(None, "--rows", min=1, help="eagle: sequences sampled side by side."),
    hours: float | None = typer.Option(None, "--hours", min=0.0, help="Stop after this long with everything "
                                       "checkpointed (sampling or training); rerun to go on."),
    fused: bool | None = typer.Option(None, "--fused/--final-features", help="eagle: read a low, a middle and a "
                                      "high target layer (EAGLE-3, default) or the final hidden state (EAGLE-1)."),
    unroll: int | None = typer.Option(None, "--unroll", min=1, help="eagle: draft depths trained together."),
    loss: str | None = typer.Option(None, "--loss", help="eagle: kl, tv (1 − acceptance) or kl+tv."),
    vocab: int | None = typer.Option(None, "--vocab", min=16, help="Head rows kept (default: eagle by coverage)."),
    steps: int | None = typer.Option(None, "--steps", min=1),
    batch_tokens: int | None = typer.Option(None, "--batch-tokens", min=16, help="eagle: tokens per training step."),
    learning_rate: float | None = typer.Option(None, "--learning-rate"),
    seed: int | None = typer.Option(None, "--seed"),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", min=1),
    layers: int | None = typer.Option(None, "--layers", min=1, help="standalone: decoder layers of the draft."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="standalone: sequences per step."),
    sequence: int | None = typer.Option(None, "--sequence", min=8, help="Longest training sequence."),
    eval_tokens: int | None = typer.Option(None, "--eval-tokens", min=8, help="standalone: held-out tokens."),
    train_tokens: int | None = typer.Option(None, "--train-tokens", help="standalone: corpus tokens to read."),
    resume: bool = typer.Option(True, help="Continue from the samples and checkpoint in --output."),
) -> None:
    """Distil a draft from the target: resumable (samples in shards, checkpoints), exports the best draft
    so far at every checkpoint, reports held-out acceptance as it goes."""
    from rich.progress import Progress

    from spectr.errors import InvalidInputError, SpectrError

    if kind not in ("eagle", "standalone"):
        _fail(InvalidInputError(f"--kind must be eagle or standalone, got {kind!r}"))
    given = lambda **values: {name: value for name, value in values.items() if value is not None}  # noqa: E731
    source = None if target == "default" else target
    try:
        with Progress() as progress:
            task = progress.add_task("train-draft", total=None)

            def report(stage, done, total):
                progress.update(task, completed=done, total=total, description=stage)

            if kind == "eagle":
                from spectr.training.eagle import LOSSES, EagleConfig, run_recipe
                from spectr.training.samples import DataRecipe

                if loss is not None and loss not in LOSSES:
                    _fail(InvalidInputError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}"))
                config = EagleConfig(**given(vocab=vocab, fused=fused, unroll=unroll, loss=loss, sequence=sequence,
                                             batch_tokens=batch_tokens, steps=steps, learning_rate=learning_rate,
                                             seed=seed, checkpoint_every=checkpoint_every))
                data = DataRecipe(**given(tokens=sample_tokens, rows=rows, seed=seed))
                final = run_recipe(source, output, config, data, samples=samples, resume=resume, hours=hours,
                                   progress=report, log=progress.console.print)
                if final is None:
                    typer.echo(f"sampling goes on next time: rerun the same command (samples in "
                               f"{samples or output / 'samples'})")
                    return
                summary = ", ".join(f"{label} {values[0]:.3f}" for label, values in final["acceptance"].items())
            else:
                from spectr.training.distill import DistillConfig, train

                config = DistillConfig(target=source, **given(
                    layers=layers, vocab=vocab, sequence=sequence, batch=batch, steps=steps,
                    learning_rate=learning_rate, seed=seed, checkpoint_every=checkpoint_every,
                    eval_tokens=eval_tokens, train_tokens_limit=train_tokens))
                final = train(config, output, resume=resume, log=progress.console.print,
                              progress=lambda step, loss: report(f"loss {loss:.3f}", step, config.steps))
                summary = f"T=1 {final['acceptance']:.3f}"
    except (SpectrError, ValueError) as error:
        _fail(error)
    typer.echo(f"held-out acceptance (first draft token) {summary} after {final['tokens']} tokens; draft in {output}")


@app.command()
def check(
    target: str = TARGET,
    precision: list[str] = typer.Option([], "--precision", help="Check only these precisions (repeatable; default: all)."),
) -> None:
    """Say what this machine runs (CPU features, spectr's kernels) and, per precision, whether a tree pass
    gives the same logits bits as one-token passes (batch invariance: greedy spectr = greedy decoding).

    Exits 1 if the default precision is not invariant here.
    """
    from rich.console import Console
    from rich.table import Table

    from spectr.checks import check_precisions, machine
    from spectr.errors import SpectrError
    from spectr.precisions import PRECISIONS

    console = Console()
    here = machine()
    console.print(f"{here.describe()}; {here.threads} threads" + (f"; {here.compiler}" if here.kernels else ""))
    unknown = [p for p in precision if p not in PRECISIONS]
    if unknown:
        _fail(ValueError(f"unknown precision {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}"))
    try:
        results = check_precisions(None if target == "default" else target, tuple(precision) or None)
    except SpectrError as error:
        _fail(error)
    table = Table(title="tree pass (8 nodes) vs one-token passes, same positions")
    for column in ("precision", "backend", "fused layers", "max |Δ logit|", "batch invariant"):
        table.add_column(column)
    for r in results:
        name = r.precision + (" (default)" if r.precision == DEFAULT_PRECISION else "")
        table.add_row(name, r.backend, "yes" if r.fused else "no", f"{r.difference:.3g}",
                      "[green]yes[/green]" if r.invariant else "[yellow]no[/yellow]")
    console.print(table)
    if not all(r.invariant for r in results):
        console.print("Where a precision is not invariant, a position's logits inside a verification tree may differ "
                      "from a one-token step's by rounding: sampling stays exact for the law the tree computes, but "
                      "greedy spectr can part from greedy decoding at near-ties.")
    if any(r.precision == DEFAULT_PRECISION and not r.invariant for r in results):
        raise typer.Exit(1)


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
    other: list[Path] = typer.Option([], "--also", help="Other trained draft folders to measure alongside "
                                     "(e.g. the previous draft)."),
    samples: Path | None = typer.Option(None, "--samples", help="A training run's samples: measure on their "
                                        "held-out split (default: a held-out set sampled once into .cache/)."),
    output: Path = typer.Option(Path("docs/drafts.md"), "--output", "-o"),
    quick: bool = typer.Option(False, help="A tiny grid, for a smoke test."),
) -> None:
    """Held-out acceptance per depth (T = 1, 0.7, greedy), block efficiency for k ∈ {1, 2, 4} × L ∈ {2, 4}
    and cost of the drafts for the default target; writes docs/drafts.md and its plots."""
    from spectr.api import DEFAULT_DRAFT_NAME
    from spectr.studies import drafts

    folder = Path(__file__).parent / "drafts" / DEFAULT_DRAFT_NAME if draft == "default" else Path(draft)
    for path in [folder, *other]:
        if not (path / "draft.json").is_file():
            _fail(f"no trained draft at {path}: make one with `spectr train-draft -o DIR`, then pass --draft DIR")
    names = {}
    for path in [folder, *other]:
        label = "shipped draft" if path == folder and draft == "default" else f"draft {path.name}"
        names[label] = path
    reports, setup = drafts.run(names, samples=samples, quick=quick,
                                log=lambda message: typer.echo(message, err=True))
    command = ("spectr study drafts" + "".join(f" --also {p.name}" for p in other)
               + (" --samples DIR" if samples else "") + (" --quick" if quick else ""))
    text = drafts.render(reports, setup, command)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    drafts.plot(reports, setup, output.with_name(output.stem + "-depths.png"))
    manifest = reports[0].manifest
    if manifest and len([h for h in manifest.get("history", []) if h.get("acceptance")]) > 1:
        drafts.plot_learning_curve(manifest, output.with_suffix(".png"))
    typer.echo(text)


def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise typer.BadParameter(f"expected a comma-separated list of {kind.__name__}s, got {text!r}",
                                 param_hint=option)
    return values


@bench_app.callback(invoke_without_command=True)
def bench(
    context: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="A small run (< 10 minutes): 2 suites, 2 prompts, T 0 and 1."),
    output: Path = typer.Option(Path("bench/results"), "--output", "-o", help="Folder for JSON, Markdown, PNGs."),
    docs: Path | None = typer.Option(None, "--docs", help="Also write the report here (default: docs/RESULTS.md "
                                     "for a full run, nothing for --quick)."),
    target: str = TARGET,
    draft: str = DRAFT,
    precision: str = PRECISION,
    suites: str = typer.Option("code,summarize,chat", "--suites"),
    prompts: int = typer.Option(4, "--prompts", min=1, help="Prompts per suite."),
    tokens: int = typer.Option(128, "--tokens", min=1, help="New tokens per prompt."),
    temperatures: str = typer.Option("0,0.7,1", "--temperatures"),
    grid_k: str = typer.Option("1,2,4,8", "--k", help="Drafts per step to try (k = 1: standard SD)."),
    grid_length: str = typer.Option("2,4,6", "--L", help="Draft lengths to try."),
    peers: bool = typer.Option(True, help="Also run transformers and llama.cpp."),
    extras: bool = typer.Option(True, help="Also the other rules (SpecInfer, RSD) and the dynamic and greedy trees, "
                                           "at fixed shapes."),
    seed: int = typer.Option(0, "--seed"),
    compare: list[str] = typer.Option([], "--compare-draft", help="Another draft (e.g. the previous trained "
                                      "draft's folder, or 'sparq', 'self-skip') run through the same grid, side by "
                                      "side (repeatable)."),
    approximate: list[str] = typer.Option([], "--approximate", help="An APPROXIMATE mode ('sparq:<rank>,<keep>') "
                                          "run as a plain loop beside the exact methods, with its measured deviation "
                                          "from the target's law (repeatable)."),
) -> None:
    """Run spectr's methods and the peers side by side on the prompt suites; write results and plots."""
    if context.invoked_subcommand is not None:
        return
    import json

    from rich.progress import Progress

    from spectr.bench import report, runner
    from spectr.errors import SpectrError

    if quick:
        config = runner.BenchConfig(suites=("code", "chat"), prompts_per_suite=2, temperatures=(0.0, 1.0),
                                    max_new_tokens=64, grid_k=(1, 2, 4), grid_length=(4,), peers=peers, seed=seed,
                                    compared_drafts=tuple(Path(c).name for c in compare),
                                    approximate=tuple(approximate), extras=extras)
        output = output / "quick" if output == Path("bench/results") else output
    else:
        config = runner.BenchConfig(suites=tuple(s.strip() for s in suites.split(",")), prompts_per_suite=prompts,
                                    temperatures=_numbers(temperatures, float, '--temperatures'), max_new_tokens=tokens, grid_k=_numbers(grid_k, int, '--k'),
                                    grid_length=_numbers(grid_length, int, '--L'), peers=peers, seed=seed,
                                    compared_drafts=tuple(Path(c).name for c in compare),
                                    approximate=tuple(approximate), extras=extras)
        docs = docs if docs is not None else Path("docs/RESULTS.md")
    try:
        engine = _engine(target, draft, precision)
        compared = {Path(c).name: engine.sibling(draft=c) for c in compare}
        compared.update({runner.approximate_label(a): engine.sibling(approximate=a) for a in approximate})
        with Progress() as progress:
            task = progress.add_task("bench", total=None)
            result = runner.run_bench(engine, config, cache_dir=output / "cache", compared=compared,
                                      progress=lambda done, total, what: progress.update(
                                          task, completed=done, total=total, description=what))
            progress.update(task, description="rules vs α*")
            chat = runner.load_suite("chat", 4 if not quick else 2)
            result["rules_vs_optimal"] = runner.rules_vs_optimal(engine, chat, config.temperatures,
                                                                 tokens=48 if not quick else 16)
    except SpectrError as error:
        _fail(error)
    output.mkdir(parents=True, exist_ok=True)
    (output / "bench.json").write_text(json.dumps(result, indent=1))
    import shlex
    import sys

    # What was run, to reproduce it, with absolute paths by their names (results name no machine's folders).
    command = "spectr " + shlex.join(report.without_machine_paths(argument) for argument in sys.argv[1:])
    path = report.write_report(result, output, command, docs)
    typer.echo(report.headline_table(result))
    typer.echo(f"results in {path}" + (f" and {docs}" if docs else ""))


@bench_app.command("report")
def bench_report(
    source: Path = typer.Option(Path("bench/results/bench.json"), "--input", "-i", help="A bench run's JSON."),
    docs: Path | None = typer.Option(Path("docs/RESULTS.md"), "--docs"),
    command: str = typer.Option("spectr bench", "--command", help="The command that produced the JSON."),
) -> None:
    """Re-render the Markdown report and plots from a saved bench JSON."""
    import json

    from spectr.bench import report

    if not source.is_file():
        _fail(FileNotFoundError(f"no bench results at {source}; run `spectr bench` first"))
    result = json.loads(source.read_text())
    path = report.write_report(result, source.parent, command, docs)
    typer.echo(f"report in {path}" + (f" and {docs}" if docs else ""))


@bench_app.command("forward")
def bench_forward(
    target: str = typer.Option("default", help="Model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    context: int = typer.Option(200, min=1, help="Cached tokens before the timed forward."),
    repeats: int = typer.Option(20, min=1, help="Interleaved repeats per backend (the minimum is reported)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the table to this Markdown file."),
    compile: bool = typer.Option(False, "--compile", help="Also time the torch.compile path (~90 s to compile)."),
) -> None:
    """Time one target forward over 1, 4, 8 and 16 new tokens for every backend and precision, and the load."""
    from rich.progress import track

    from spectr.bench import forward

    source = None if target == "default" else target
    counts = forward.NEW_TOKEN_COUNTS
    load = forward.load_seconds(source)
    steps = iter(track(range(repeats), description="bench forward", transient=True))
    next(steps, None)
    results = forward.run(source, context=context, new_token_counts=counts, repeats=repeats,
                          progress=lambda: next(steps, None), compile=compile)
    table = forward.render(results, context, counts, repeats, load=load)
    typer.echo(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(f"# Target forward cost\n\nProduced by `spectr bench forward`.\n\n{table}")


@bench_app.command("serve")
def bench_serve(
    target: str = TARGET, draft: str = DRAFT, precision: str = PRECISION,
    clients: str = typer.Option("1,2,4,8,16", "--clients", help="Levels of concurrent clients."),
    requests: int = typer.Option(6, "--requests", min=1, help="Requests each client sends, one after another."),
    max_concurrency: int = typer.Option(8, "--max-concurrency", min=1, help="The server's flag."),
    max_queue: int = typer.Option(16, "--max-queue", min=0, help="The server's flag."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="The server's flag."),
    k: int | None = typer.Option(None, "-k", help="Sent with every request (default: the server's default shape)."),
    length: int | None = typer.Option(None, "-L", help="Sent with every request."),
    seed: int | None = typer.Option(None, "--seed", help="Seed request n of a level with seed + n, so that its "
                                    "answers repeat (default: unseeded, as most traffic is)."),
    output: Path = typer.Option(Path("bench/results/serve"), "--output", "-o", help="Folder for JSON, Markdown, PNG."),
) -> None:
    """Load-test `spectr serve` in its own process: start-up time, then tokens/s, time to first token, memory
    and every outcome (no 5xx allowed) per level of concurrent clients."""
    import json

    from spectr.bench import serve

    levels = tuple(int(c) for c in clients.split(","))
    serve_args = [f"--max-concurrency={max_concurrency}", f"--max-queue={max_queue}", f"--precision={precision}",
                  "--batching" if batching else "--no-batching"]
    serve_args += [] if target == "default" else [f"--target={target}"]
    serve_args += [] if draft == "default" else [f"--draft={draft}"]
    extra = {name: value for name, value in (("k", k), ("L", length)) if value is not None}
    result = serve.run(serve_args, levels, extra, progress=lambda level: typer.echo(
        f"{level['clients']} clients: {level['tokens_per_second']:.1f} tok/s, TTFT p50 {level['ttft_p50']} s, "
        f"5xx {level['server_errors']}", err=True), requests=requests, seed=seed)
    output.mkdir(parents=True, exist_ok=True)
    (output / "serve.json").write_text(json.dumps(result, indent=1))
    markdown = serve.render(result, "spectr bench serve " + " ".join(
        f"--clients {clients} --requests {requests} --max-concurrency {max_concurrency}".split()
        + ([] if batching else ["--no-batching"]) + ([f"-k {k}"] if k else []) + ([f"-L {length}"] if length else [])
        + ([f"--seed {seed}"] if seed is not None else [])))
    (output / "serve.md").write_text(markdown + "\n![throughput and time to first token](serve.png)\n")
    serve.plot(result, output / "serve.png")
    typer.echo(markdown)
    bad = sum(level["server_errors"] + level["wrong_length"] for level in result["levels"])
    if bad:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
