"""How good the drafts are for the default target: acceptance, block efficiency, cost.

    spectr study drafts            # writes docs/drafts.md (+ the training curves next to it)

Acceptance is measured on held-out chat: answers the target samples itself
(T = 1) to the hand-written chat prompts of the bench (never produced by the
training templates). Per-token acceptance of one draft (k = 1, first draft
token) at temperature T is Σ_x min(p_T(x), q_T(x)) along those answers
(greedy: whether the argmaxes agree), with q taken from the drafter itself
(so an EAGLE-style head reads the target's features exactly as when decoding).
Block efficiency is measured by running the decoder, at T = 1 and T = 0.
"""

from dataclasses import dataclass
import statistics
import time
from pathlib import Path

import torch

import spectr
from spectr.bench.runner import sample_continuation
from spectr.bench.suites import CHAT_PROMPTS
from spectr.drafters.base import root_distributions
from spectr.processing import SamplingParams, logits_to_probs

TEMPERATURES = {"T = 1": 1.0, "T = 0.7": 0.7, "greedy": 0.0}


@dataclass
class DraftReport:
    name: str
    acceptance: dict[str, float]  # temperature label -> mean per-token acceptance (k = 1, first draft token)
    block_efficiency: dict[float, dict[tuple[int, int], float]]  # temperature -> (k, L) -> tokens per target pass
    step_cost: float | None  # one draft forward / one target forward (1 token, same context)


def sample_answers(engine: spectr.Engine, count: int, tokens: int, seed: int) -> list[tuple[int, list[int]]]:
    """(prompt length, chat prompt + the target's own T = 1 answer) as token ids."""
    sequences = []
    for index, prompt in enumerate(CHAT_PROMPTS[:count]):
        ids = spectr.api.encode_prompt(engine, prompt, chat=True)
        sequences.append((len(ids), ids + sample_continuation(engine, ids, tokens, seed + index)))
    return sequences


def acceptance(engine: spectr.Engine, sequences, temperature: float) -> float:
    """Mean first-draft-token acceptance along the answers, q straight from the drafter."""
    params = SamplingParams(temperature=temperature)
    lm = engine.target.lm
    values = []
    for prompt_length, ids in sequences:
        out = lm.forward(torch.tensor([ids]), torch.arange(len(ids)), lm.new_cache(len(ids)))
        for position, q in root_distributions(engine.drafter(), ids, prompt_length - 1, out.hidden[0], params):
            p = logits_to_probs(out.logits[0, position : position + 1], params)[0]
            values.append(float(p.argmax() == q.argmax()) if temperature == 0 else float(torch.minimum(p, q).sum()))
    return statistics.fmean(values)


def step_cost(engine: spectr.Engine, context: int = 200, repeats: int = 20) -> float:
    """One draft forward over 1 new token / one target forward, both over `context` cached tokens."""
    def best(lm, with_features: bool) -> float:
        cache = lm.new_cache(context + 1)
        extra = (lambda n: {"features": torch.zeros(1, n, lm.config.hidden_size)}) if with_features else (lambda n: {})
        lm.forward(torch.zeros(1, context, dtype=torch.long), torch.arange(context), cache, **extra(context))
        times = []
        for _ in range(repeats):
            cache.truncate(context)
            start = time.perf_counter()
            lm.forward(torch.zeros(1, 1, dtype=torch.long), torch.tensor([context]), cache, **extra(1))
            times.append(time.perf_counter() - start)
        return min(times)

    draft = engine.draft.lm
    return best(draft, getattr(draft, "feature_projection", None) is not None) / best(engine.target.lm, False)


def block_efficiency(engine, ks, lengths, prompts: int, tokens: int, temperature: float) -> dict:
    table = {}
    for k in ks:
        for length in lengths:
            emitted, passes = 0, 0
            for index, prompt in enumerate(CHAT_PROMPTS[:prompts]):
                result = spectr.generate(engine, prompt, chat=True, method="sd" if k == 1 else "spectr", k=k, L=length,
                                         temperature=temperature, max_new_tokens=tokens, seed=index)
                emitted += result.stats.new_tokens
                passes += result.stats.steps
            table[(k, length)] = emitted / passes
    return table


def run(drafts: dict[str, str], quick: bool = False, log=print) -> tuple[list[DraftReport], dict]:
    """Measure each named draft (name -> `--draft` value), then n-gram lookups, on the same answers."""
    ks, lengths = ((1, 2), (2, 4)) if quick else ((1, 2, 4, 8), (2, 4, 6, 8))
    prompts, tokens = (2, 24) if quick else (4, 64)
    temperatures = (1.0,) if quick else (1.0, 0.0)
    reports = []
    base = spectr.load(draft="ngram")
    sequences = sample_answers(base, 2 if quick else len(CHAT_PROMPTS), 32 if quick else 96, seed=100)
    log(f"{sum(len(ids) - n for n, ids in sequences)} answer tokens sampled from the target")
    for name, draft in list(drafts.items()) + [("n-gram lookup", "ngram")]:
        engine = spectr.Engine(target=base.target, draft=spectr.api._load_draft(draft, base.target, "bf16"))
        model_draft = engine.draft is not None
        reports.append(DraftReport(
            name=name,
            acceptance={label: acceptance(engine, sequences, t) for label, t in TEMPERATURES.items()}
            if model_draft else {},
            block_efficiency={t: block_efficiency(engine, ks, lengths, prompts, tokens, t) for t in temperatures},
            step_cost=step_cost(engine) if model_draft else None,
        ))
        log(f"{name} measured")
    return reports, {"ks": ks, "lengths": lengths, "prompts": prompts, "tokens": tokens,
                     "answers": len(sequences), "answer_tokens": sum(len(ids) - n for n, ids in sequences)}


def render(reports: list[DraftReport], setup: dict, manifest: dict | None, command: str) -> str:
    lines = ["# Drafts for the default target (SmolLM2-135M-Instruct)", "",
             f"Produced by `{command}`. Acceptance: mean per-token acceptance of one draft (k = 1, the first "
             f"draft token) along {setup['answers']} chat answers ({setup['answer_tokens']} tokens) the target "
             "sampled itself at T = 1, for the bench's hand-written chat prompts (held out: no training "
             "instruction comes from them). Block efficiency (tokens per target pass): the decoder on "
             f"{setup['prompts']} chat prompts, {setup['tokens']} new tokens each (k = 1: standard speculative "
             "sampling; k > 1: K-SEQ).", ""]
    for report in reports:
        lines += [f"## {report.name}", ""]
        if report.acceptance:
            lines.append("| " + " | ".join(report.acceptance) + " |")
            lines.append("|---" * len(report.acceptance) + "|")
            lines.append("| " + " | ".join(f"{v:.3f}" for v in report.acceptance.values()) + " |")
            lines.append("")
        if report.step_cost is not None:
            lines += [f"One draft forward costs {report.step_cost:.3f} of a target forward (1 token, 200 cached).", ""]
        for temperature, table in report.block_efficiency.items():
            lines.append(f"Block efficiency at T = {temperature:g}:")
            lines.append("")
            lines.append("| k \\ L | " + " | ".join(str(length) for length in setup["lengths"]) + " |")
            lines.append("|---" * (len(setup["lengths"]) + 1) + "|")
            for k in setup["ks"]:
                cells = [f"{table[(k, length)]:.2f}" for length in setup["lengths"]]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
    if manifest:
        lines += ["## Training of the shipped draft", "", f"Recipe: `{manifest['recipe']}`", ""]
        if manifest.get("samples"):
            lines += [f"Data: `{manifest['samples']}` (sampling took {manifest.get('sampling_seconds', '?')} s)", ""]
        history = manifest["history"]
        if history and isinstance(history[-1]["acceptance"], dict):
            labels = list(history[-1]["acceptance"])
            depths = len(history[-1]["acceptance"][labels[0]])
            header = [f"{label} d{d + 1}" for label in labels for d in range(depths)]
            lines += ["Held-out acceptance (target-sampled text of held-out instructions) at draft depth d "
                      "(the head feeding back its own features), by training tokens:", "",
                      "| step | training tokens | loss | " + " | ".join(header) + " |",
                      "|---" * (len(header) + 3) + "|"]
            for entry in history:
                values = [entry["acceptance"][label][d] for label in labels for d in range(depths)]
                loss = "–" if entry["loss"] is None else f"{entry['loss']:.3f}"
                lines.append(f"| {entry['step']} | {entry['tokens']} | {loss} | "
                             + " | ".join(f"{v:.3f}" for v in values) + " |")
        else:
            lines += ["| training tokens | held-out acceptance (T = 1) |", "|---|---|"]
            for entry in history:
                lines.append(f"| {entry['tokens']} | {entry['acceptance']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def plot_learning_curve(manifest: dict, path: Path) -> None:
    """Held-out acceptance vs training tokens (each depth, T = 1) and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = manifest["history"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    tokens = [h["tokens"] for h in history]
    if isinstance(history[-1]["acceptance"], dict):
        for label, values in history[-1]["acceptance"].items():
            for depth in range(len(values)):
                left.plot(tokens, [h["acceptance"][label][depth] for h in history], marker=".",
                          label=f"{label}, depth {depth + 1}", alpha=1.0 if depth == 0 else 0.6)
        left.legend(fontsize=7)
    else:
        left.plot(tokens, [h["acceptance"] for h in history], marker="o")
    left.set_xlabel("training tokens")
    left.set_ylabel("held-out acceptance")
    left.grid(alpha=0.3)
    losses = [(h["tokens"], h["loss"]) for h in history if h["loss"] is not None]
    if losses:
        right.plot(*zip(*losses), marker=".")
    right.set_xlabel("training tokens")
    right.set_ylabel("training loss (at checkpoints)")
    right.grid(alpha=0.3)
    figure.suptitle("Trained draft for SmolLM2-135M-Instruct")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
