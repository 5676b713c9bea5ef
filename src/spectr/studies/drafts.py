"""How good the drafts are for the default target, on text no draft was trained on.

    spectr study drafts --also OLD_DRAFT     # writes docs/drafts.md and its plots

The held-out split: the target's own answers to prompts whose hash puts them
in the held-out split (`training/samples.py`, `held_out_only`), written and
answered by the same recipe the training data comes from (Magpie prompts,
template instructions, raw-text continuations) — or the held-out sequences
of a training run's samples (`--samples`). For each draft:
  - acceptance per depth: the head unrolled along the held-out text, depth r
    reading its own depth r−1 outputs (as when drafting), mean Σ min(p, q) at
    T = 1 and 0.7, and argmax agreement (greedy);
  - depth-1 acceptance as deployed: q straight from the drafter (its
    precision and kernels) on the bench's chat answers;
  - block efficiency of the decoder (tokens per target pass) on held-out
    chat prompts for (k, L) ∈ {1, 2, 4} × {2, 4} at T = 1 and T = 0;
  - the cost of one draft depth relative to one target step.
"""

from dataclasses import dataclass, field
import json
import statistics
import time
from pathlib import Path

import torch

import spectr
from spectr.bench.runner import sample_continuation
from spectr.bench.suites import CHAT_PROMPTS
from spectr.api import _load_draft
from spectr.drafters.base import capture_kwargs, root_distributions, target_features
from spectr.precisions import DEFAULT_DRAFT_PRECISION
from spectr.processing import SamplingParams, logits_to_probs

TEMPERATURES = {"T=1": 1.0, "T=0.7": 0.7, "greedy": 0.0}
KS, LENGTHS = (1, 2, 4), (2, 4)


@dataclass
class DraftReport:
    name: str
    depth_acceptance: dict[str, list[float]] = field(default_factory=dict)  # label -> per depth (held-out)
    deployed_acceptance: dict[str, float] = field(default_factory=dict)  # label -> depth 1, as drafted
    block_efficiency: dict[float, dict[tuple[int, int], float]] = field(default_factory=dict)  # T -> (k, L) -> BE
    step_cost: float | None = None  # one draft depth / one target forward (1 token, same context)
    manifest: dict | None = None


def held_out_set(target, samples: Path | None, cache: Path, tokens: int, log=print):
    """Held-out sequences: those of `samples` if given, else a held-out-only set made (once) under `cache`."""
    from spectr.models.loading import stop_token_ids
    from spectr.training.samples import DataRecipe, generate_dataset, load_sequences

    if samples is not None:
        sequences = load_sequences(samples, held_out=True, limit_tokens=tokens)
        if not sequences:
            raise ValueError(f"{samples} holds no held-out sequences")
        return sequences
    recipe = DataRecipe(tokens=tokens, rows=32, chunk_steps=768, held_out_only=True, seed=12345)
    log(f"sampling a held-out set of {tokens} tokens from the target into {cache} (once) ...")
    generate_dataset(target.lm, target.tokenizer, cache, recipe, stop_token_ids(target.tokenizer), log=log)
    return load_sequences(cache, held_out=True)


def load_head(folder: Path, target):
    """The trained head at `folder` as the training module's EagleHead (float32 of its shipped weights), its
    kept tokens and the target layers it reads."""
    from safetensors.torch import load_file

    from spectr.models.llama import rotary_tables
    from spectr.training.eagle import EagleHead

    manifest = json.loads((folder / "draft.json").read_text())
    layers = tuple(manifest.get("feature_layers") or ())
    head = EagleHead(target.hf_config, rotary_tables(target.hf_config, target.hf_config.max_position_embeddings),
                     fused_layers=len(layers))
    tensors = load_file(str(folder / "draft.safetensors"))
    kept = tensors.pop("kept_tokens").long()
    names = {exported: own for own, exported in _export_names(head).items()}
    head.load_state_dict({names[name]: tensor.float() for name, tensor in tensors.items()})
    return head.eval(), kept, layers, manifest


def _export_names(head) -> dict[str, str]:
    """The head's parameter name -> the name it is exported under (export_state shares the storage)."""
    exported = {tensor.data_ptr(): name for name, tensor in head.export_state().items()}
    return {own: exported[parameter.data_ptr()] for own, parameter in head.named_parameters()}


def depth_acceptance(folder: Path, target, sequences, depths: int) -> dict[str, list[float]]:
    from spectr.training.eagle import EagleConfig, evaluate

    head, kept, layers, _ = load_head(folder, target)
    embedding = target.weight("model.embed_tokens.weight")
    head_rows = embedding if target.hf_config.tie_word_embeddings else target.weight("lm_head.weight")
    config = EagleConfig(fused=bool(layers), unroll=depths, sequence=512, temperatures=tuple(TEMPERATURES.values()))
    return evaluate(head, sequences, embedding, head_rows, kept, config, depths=depths)


def sample_answers(engine: spectr.Engine, count: int, tokens: int, seed: int) -> list[tuple[int, list[int]]]:
    """(prompt length, chat prompt + the target's own T = 1 answer) as token ids."""
    sequences = []
    for index, prompt in enumerate(CHAT_PROMPTS[:count]):
        ids = spectr.api.encode_prompt(engine, prompt, chat=True)
        sequences.append((len(ids), ids + sample_continuation(engine, ids, tokens, seed + index)))
    return sequences


def deployed_acceptance(engine: spectr.Engine, sequences, temperature: float) -> float:
    """Mean first-draft-token acceptance along the answers, q straight from the drafter."""
    params = SamplingParams(temperature=temperature)
    lm = engine.target.lm
    values = []
    drafter = engine.drafter()
    for prompt_length, ids in sequences:
        out = lm.forward(torch.tensor([ids]), torch.arange(len(ids)), lm.new_cache(len(ids)),
                         **capture_kwargs(drafter))
        for position, q in root_distributions(drafter, ids, prompt_length - 1, target_features(drafter, out), params):
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


def tokens_per_pass(engine, prompts: list[list[int]], tokens: int, temperature: float, **options) -> float:
    """Block efficiency: tokens emitted per target pass over `prompts` (token ids), prompt i seeded i."""
    emitted = passes = 0
    for index, ids in enumerate(prompts):
        result = spectr.generate(engine, ids, temperature=temperature, max_new_tokens=tokens, seed=index,
                                 **options)
        emitted, passes = emitted + result.stats.new_tokens, passes + result.stats.steps
    return emitted / passes


def block_efficiency(engine, prompts: list[list[int]], tokens: int, temperature: float) -> dict:
    return {(k, length): tokens_per_pass(engine, prompts, tokens, temperature,
                                         method="sd" if k == 1 else "spectr", k=k, L=length)
            for k in KS for length in LENGTHS}


def run(drafts: dict[str, Path], samples: Path | None = None, quick: bool = False,
        cache: Path = Path(".cache/heldout"), log=print) -> tuple[list[DraftReport], dict]:
    """Measure each named trained draft (name -> folder) and n-gram lookups on the same held-out text."""
    base = spectr.load(draft="ngram")
    target = base.target
    sequences = held_out_set(target, samples, cache, 4_000 if quick else 24_000, log=log)
    depths = 2 if quick else max(LENGTHS)
    chat = [s for s in sequences if s.source != "text"]
    prompts = [s.tokens[: s.prompt_length].tolist() for s in chat[: 2 if quick else 6]]
    tokens = 24 if quick else 64
    temperatures = (1.0,) if quick else (1.0, 0.0)
    answers = sample_answers(base, 2 if quick else len(CHAT_PROMPTS), 32 if quick else 96, seed=100)
    log(f"held-out set: {len(sequences)} sequences, {sum(s.tokens.numel() - s.prompt_length for s in sequences)} "
        f"sampled tokens; {len(prompts)} held-out chat prompts for block efficiency")
    reports = []
    for name, folder in list(drafts.items()) + [("n-gram lookup", None)]:
        engine = spectr.Engine(target=target, draft=None if folder is None else _load_draft(
            folder, target, DEFAULT_DRAFT_PRECISION))
        report = DraftReport(name=name)
        if folder is not None:
            report.manifest = json.loads((Path(folder) / "draft.json").read_text())
            report.depth_acceptance = depth_acceptance(Path(folder), target, sequences, depths)
            report.deployed_acceptance = {label: deployed_acceptance(engine, answers, t)
                                          for label, t in TEMPERATURES.items()}
            report.step_cost = step_cost(engine)
        report.block_efficiency = {t: block_efficiency(engine, prompts, tokens, t) for t in temperatures}
        reports.append(report)
        log(f"{name} measured")
    return reports, {"held_out_sequences": len(sequences), "depths": depths, "prompts": len(prompts),
                     "tokens": tokens, "temperatures": temperatures,
                     "held_out_tokens": sum(s.tokens.numel() - s.prompt_length for s in sequences),
                     "answer_tokens": sum(len(ids) - n for n, ids in answers)}


def render(reports: list[DraftReport], setup: dict, command: str) -> str:
    lines = ["# Drafts for the default target (SmolLM2-135M-Instruct)", "",
             f"Produced by `{command}`. Held-out split: {setup['held_out_sequences']} sequences "
             f"({setup['held_out_tokens']} sampled tokens) the target wrote for prompts of the held-out split "
             "(never trained on). Acceptance per depth: the head unrolled along that text, Σ min(p, q) "
             "(greedy: argmax agreement). As deployed: depth 1, q from the drafter itself (default draft "
             f"precision) on {setup['answer_tokens']} answer tokens to the bench's chat prompts. Block efficiency "
             f"(tokens per target pass): the decoder on {setup['prompts']} held-out chat prompts, "
             f"{setup['tokens']} new tokens each (k = 1: standard speculative sampling; k > 1: K-SEQ).", "",
             "![acceptance per depth](drafts-depths.png)", ""]
    models = [r for r in reports if r.depth_acceptance]
    if models:
        lines += ["## Acceptance per depth (held-out)", "",
                  "| draft | " + " | ".join(f"{label} d{d + 1}" for label in TEMPERATURES
                                           for d in range(setup["depths"])) + " |",
                  "|---" * (1 + len(TEMPERATURES) * setup["depths"]) + "|"]
        for r in models:
            lines.append(f"| {r.name} | " + " | ".join(f"{v:.3f}" for label in TEMPERATURES
                                                     for v in r.depth_acceptance[label]) + " |")
        lines += ["", "## Depth 1 as deployed, and cost", "",
                  "| draft | " + " | ".join(TEMPERATURES) + " | one depth / one target step |",
                  "|---" * (len(TEMPERATURES) + 2) + "|"]
        for r in models:
            lines.append(f"| {r.name} | " + " | ".join(f"{r.deployed_acceptance[label]:.3f}" for label in TEMPERATURES)
                         + f" | {r.step_cost:.3f} |")
        lines.append("")
    for temperature in setup["temperatures"]:
        lines += [f"## Block efficiency at T = {temperature:g}", "",
                  "| draft | " + " | ".join(f"k={k} L={length}" for k in KS for length in LENGTHS) + " |",
                  "|---" * (1 + len(KS) * len(LENGTHS)) + "|"]
        for r in reports:
            table = r.block_efficiency[temperature]
            lines.append(f"| {r.name} | " + " | ".join(f"{table[(k, length)]:.2f}" for k in KS for length in LENGTHS)
                         + " |")
        lines.append("")
    for r in models:
        m = r.manifest
        lines += [f"## How {r.name} was made", "",
                  f"Format {m.get('format')}, feature layers {m.get('feature_layers') or 'final hidden state'}; "
                  f"recipe `{m.get('recipe')}`.", ""]
        if m.get("samples"):
            lines += [f"Data: `{m['samples']}`.", ""]
        if m.get("vocabulary"):
            lines += [f"Vocabulary: `{m['vocabulary']}`.", ""]
        if m.get("made_on"):
            lines += [f"Made on: {m['made_on']}.", ""]
    return "\n".join(lines)


def plot(reports: list[DraftReport], setup: dict, path: Path) -> None:
    """Acceptance per depth (each temperature) and block efficiency per shape, one line per draft."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TEMPERATURES) + 1, figsize=(4 * (len(TEMPERATURES) + 1), 3.4))
    for axis, label in zip(axes, TEMPERATURES):
        for r in reports:
            if r.depth_acceptance:
                values = r.depth_acceptance[label]
                axis.plot(range(1, len(values) + 1), values, marker="o", label=r.name)
        axis.set_title(f"held-out acceptance, {label}")
        axis.set_xlabel("draft depth")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    shapes = [(k, length) for k in KS for length in LENGTHS]
    for r in reports:
        table = r.block_efficiency[setup["temperatures"][0]]
        axes[-1].plot(range(len(shapes)), [table[s] for s in shapes], marker="s", label=r.name)
    axes[-1].set_xticks(range(len(shapes)), [f"{k}×{length}" for k, length in shapes], fontsize=7)
    axes[-1].set_title(f"block efficiency, T = {setup['temperatures'][0]:g} (k × L)")
    axes[-1].grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_learning_curve(manifest: dict, path: Path) -> None:
    from spectr.training.eagle import plot_learning_curve as plot_curve

    plot_curve(manifest, path)
