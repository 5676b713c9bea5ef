"""How good the drafts are for the default target: acceptance, block efficiency, cost.

    spectr study drafts            # writes docs/drafts.md
Acceptance is measured on held-out chat: answers the target samples itself
(T = 1) to instructions unlike the training text. Per-token acceptance of one
draft at temperature T is Σ_x min(p_T(x), q_T(x)) along those answers
(greedy: whether the argmaxes agree). Block efficiency is measured by running
the decoder.
"""

from dataclasses import dataclass
import statistics
import time
from pathlib import Path

import torch

import spectr
from spectr.processing import SamplingParams, logits_to_probs

CHAT_PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a ten-year-old.",
    "What are the pros and cons of working from home?",
    "Write a haiku about autumn rain.",
    "How do I make a simple tomato sauce?",
    "Summarise the plot of Romeo and Juliet in four sentences.",
    "Suggest a name for a coffee shop run by cats, and explain it.",
]


@dataclass
class DraftReport:
    name: str
    acceptance: dict[str, float]  # temperature label -> mean per-token acceptance
    block_efficiency: dict[tuple[int, int], float]  # (k, L) -> emitted tokens per target pass
    step_cost: float | None  # one draft forward / one target forward (1 token, same context)


def sample_answers(engine: spectr.Engine, count: int, tokens: int, seed: int) -> list[list[int]]:
    """Chat prompt + the target's own T = 1 answer, as token ids."""
    sequences = []
    for index, prompt in enumerate(CHAT_PROMPTS[:count]):
        ids = spectr.api.encode_prompt(engine, prompt, chat=True)
        answer = spectr.generate(engine, ids, method="ar", temperature=1.0, max_new_tokens=tokens, seed=seed + index)
        sequences.append((len(ids), ids + answer.tokens))
    return sequences


def acceptance(engine: spectr.Engine, sequences, temperature: float) -> float:
    params = SamplingParams(temperature=temperature)
    values = []
    for prompt_length, ids in sequences:
        tokens = torch.tensor([ids])
        positions = torch.arange(len(ids))
        target = engine.target.lm.forward(tokens, positions, engine.target.lm.new_cache(len(ids))).logits[0]
        draft = engine.draft.lm.forward(tokens, positions, engine.draft.lm.new_cache(len(ids))).logits[0]
        p = logits_to_probs(target[prompt_length - 1 : -1], params)
        q = logits_to_probs(draft[prompt_length - 1 : -1], params)
        values.extend(torch.minimum(p, q).sum(-1).tolist())
    return statistics.fmean(values)


def step_cost(engine: spectr.Engine, context: int = 200, repeats: int = 20) -> float:
    def best(lm) -> float:
        cache = lm.new_cache(context + 1)
        lm.forward(torch.zeros(1, context, dtype=torch.long), torch.arange(context), cache)
        times = []
        for _ in range(repeats):
            cache.truncate(context)
            start = time.perf_counter()
            lm.forward(torch.zeros(1, 1, dtype=torch.long), torch.tensor([context]), cache)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(engine.draft.lm) / best(engine.target.lm)


def block_efficiency(engine, ks, lengths, prompts: int, tokens: int, temperature: float) -> dict:
    table = {}
    for k in ks:
        for length in lengths:
            emitted, passes = 0, 0
            for index, prompt in enumerate(CHAT_PROMPTS[:prompts]):
                result = spectr.generate(engine, prompt, chat=True, k=k, L=length, temperature=temperature,
                                         max_new_tokens=tokens, seed=index)
                emitted += result.stats.new_tokens
                passes += result.stats.steps
            table[(k, length)] = emitted / passes
    return table


def run(draft: str, quick: bool = False, log=print) -> tuple[list[DraftReport], dict]:
    ks, lengths = ((1, 2), (2, 4)) if quick else ((1, 2, 4, 8), (2, 4, 6, 8))
    prompts, tokens = (2, 24) if quick else (4, 64)
    reports = []
    trained = spectr.load(draft=draft)
    sequences = sample_answers(trained, 2 if quick else len(CHAT_PROMPTS), 32 if quick else 96, seed=100)
    log(f"{sum(len(ids) - n for n, ids in sequences)} answer tokens sampled from the target")
    labels = {"T = 1": 1.0, "T = 0.7": 0.7, "greedy": 0.0}
    reports.append(DraftReport(
        name=f"trained ({draft})",
        acceptance={label: acceptance(trained, sequences, t) for label, t in labels.items()},
        block_efficiency=block_efficiency(trained, ks, lengths, prompts, tokens, 1.0),
        step_cost=step_cost(trained),
    ))
    log("trained draft measured")
    ngram = spectr.Engine(target=trained.target, draft=None)
    reports.append(DraftReport(name="n-gram lookup", acceptance={},
                               block_efficiency=block_efficiency(ngram, ks, lengths, prompts, tokens, 1.0),
                               step_cost=None))
    return reports, {"ks": ks, "lengths": lengths, "prompts": prompts, "tokens": tokens,
                     "answers": len(sequences)}


def render(reports: list[DraftReport], setup: dict, manifest: dict | None, command: str) -> str:
    lines = ["# Drafts for the default target (SmolLM2-135M-Instruct)", "",
             f"Produced by `{command}`. Acceptance: mean per-token acceptance of one draft along "
             f"{setup['answers']} chat answers the target sampled itself at T = 1 (held out: the draft trains "
             "on Python's documentation and source). Block efficiency: the decoder at T = 1 on "
             f"{setup['prompts']} chat prompts, {setup['tokens']} new tokens each.", ""]
    for report in reports:
        lines += [f"## {report.name}", ""]
        if report.acceptance:
            lines.append("| " + " | ".join(report.acceptance) + " |")
            lines.append("|---" * len(report.acceptance) + "|")
            lines.append("| " + " | ".join(f"{v:.3f}" for v in report.acceptance.values()) + " |")
            lines.append("")
        if report.step_cost is not None:
            lines += [f"One draft forward costs {report.step_cost:.3f} of a target forward (1 token, 200 cached).", ""]
        lines.append("| k \\ L | " + " | ".join(str(length) for length in setup["lengths"]) + " |")
        lines.append("|---" * (len(setup["lengths"]) + 1) + "|")
        for k in setup["ks"]:
            cells = [f"{report.block_efficiency[(k, length)]:.2f}" for length in setup["lengths"]]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    if manifest:
        lines += ["## Training", "", f"Recipe: `{manifest['recipe']}`", "",
                  "| training tokens | held-out acceptance (docs & code, T = 1) |", "|---|---|"]
        for entry in manifest["history"]:
            lines.append(f"| {entry['tokens']} | {entry['acceptance']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def plot_learning_curve(manifest: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = manifest["history"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([h["tokens"] for h in history], [h["acceptance"] for h in history], marker="o")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("held-out acceptance (T = 1)")
    axis.set_title("Trained draft for SmolLM2-135M-Instruct")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
