"""The decoder's output law, tested on long generations from real (tiny) neural models.

Exactness means that every emitted token, given the text before it, has the
target's processed law p(·|prefix). So one long generation is many draws, each
from a known law: the target's p at its position (one forward over the final
text gives them all). The draws are pooled by a category that depends only on
the prefix — here how strongly the draft over- or under-proposes the token,
log2 q(x)/p(x), with q the draft's law at the same prefix — since that is the
axis along which a wrong acceptance test or residual moves mass. The counts
per category are then compared with their expectations Σ_t P_t(category) by
a chi-square that uses their exact covariance Σ_t (diag P_t − P_t P_tᵀ)
(a martingale central limit; the draws' laws differ from token to token).

The models are built so that such faults are visible: a one-layer target and
drafts that are sharpened copies of it (q ∝ p^γ), so the draft over-proposes
the likely tokens, which hold most of the mass, and accepts them only in part.
"""

from dataclasses import dataclass

import torch

from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters.trained import target_identity
from spectr.models import native_forward
from spectr.models.llama import rotary_tables
from spectr.processing import SamplingParams, logits_to_probs
from spectr.rules import Rule
from spectr.rules.base import SelectionPlan
from spectr.rules.block import BlockPlan
from spectr.rules.kseq import KSeqRule, kseq_plan, kseq_rho_star
from spectr.training.eagle import EagleConfig, EagleHead, export
from tests.models.tiny import tiny_model
from tests.stats import pooled_chi_square_pvalue

RATIO_EDGES = torch.tensor([-1.0, 0.0])  # log2 q/p: under-proposed by 2x or more (q = 0 too), under, over
SHARPEN = 1.6  # the drafts' logits are the target's times this (before the shared temperature)


def law_target():
    """A one-layer tiny transformers model whose token embeddings all have the same RMS, so that an
    EAGLE-style head can reproduce its layer exactly (the head RMS-normalises the embedding it reads)."""
    hf = tiny_model("llama-gqa", seed=0, initializer_range=0.6, num_hidden_layers=1)
    with torch.no_grad():
        embedding = hf.get_input_embeddings().weight
        rms = embedding.pow(2).mean(-1, keepdim=True).sqrt()
        embedding.mul_(rms.mean() / rms)
    return hf


def perturbed_copy(hf_target, sharpen: float = SHARPEN, noise: float = 0.0):
    """spectr's forward of the target with its final norm scaled (logits x sharpen) and its layers' weights
    jittered by `noise` of their spread: a draft that agrees with the target, more or less."""
    draft = native_forward(hf_target, "fp32")
    draft.norm = draft.norm * sharpen
    if noise:
        generator = torch.Generator().manual_seed(7)
        for layer in draft.layers:
            for linear in (layer.qkv, layer.output, layer.gate_up, layer.down):  # new tensors: the target's stay
                linear.weight = linear.weight + torch.randn(linear.weight.shape, generator=generator) * (
                    noise * linear.weight.std())
    return draft


def sharpened_head(hf_target, folder, sharpen: float = SHARPEN):
    """An EAGLE-style head that reproduces the one-layer target, sharpened, over 15/16 of the vocabulary.

    fc passes the normalised embedding through (scaled back to the embeddings' RMS) and reads the
    feature only a little, so the decoder's feature feeding still matters; weights round to bf16.
    """
    config = hf_target.config
    head = EagleHead(config, rotary_tables(config, config.max_position_embeddings))
    head.init_from(hf_target.state_dict(), 0)
    dim = config.hidden_size
    rms = float(hf_target.get_input_embeddings().weight.detach().pow(2).mean(-1).sqrt().mean())
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        head.fc.weight.copy_(torch.cat([torch.randn(dim, dim, generator=generator) * 1e-3,
                                        torch.eye(dim) * rms], 1))
        head.norm.mul_(sharpen)
    vocab = config.vocab_size
    kept = torch.randperm(vocab, generator=generator)[: vocab * 15 // 16].sort().values
    export(head, kept, EagleConfig(), [], folder, target_identity(hf_target))
    return folder


class RhoTooSmall(KSeqRule):
    """Near negative control: K-SEQ run at 0.95 ρ* (the residual built for that ρ, as the rule does)."""

    name = "kseq"

    def plan(self, target_probs, draft_probs, candidates) -> SelectionPlan:
        rho = kseq_rho_star(target_probs, draft_probs, candidates.shape[-1]) * 0.95
        return kseq_plan(target_probs, draft_probs, candidates, rho)


class TooEager(Rule):
    """Near negative control for any rule: every accept chance 5 % too high (what ρ 5 % too small does
    to K-SEQ's), the residual unchanged."""

    def __init__(self, rule: Rule):
        self.rule, self.name = rule, rule.name
        self.path_level = rule.path_level

    def path_plan(self, target_probs, draft_probs, tokens):
        """A path-level rule (block verification): every stop chance past τ = 0 made 5 % higher."""
        plan = self.rule.path_plan(target_probs, draft_probs, tokens)
        stop = torch.cat([plan.stop_probs[:1], (plan.stop_probs[1:] * 1.05).clamp(max=1.0)])
        return BlockPlan(stop_probs=stop, residual_probs=plan.residual_probs)

    def plan(self, target_probs, draft_probs, candidates) -> SelectionPlan:
        plan = self.rule.plan(target_probs, draft_probs, candidates)
        return SelectionPlan((plan.accept_probs * 1.05).clamp(max=1.0), plan.residual_probs)

    def acceptance_probability(self, target_probs, draft_probs, k):
        return None

    def tree_candidates(self, candidates):
        return self.rule.tree_candidates(candidates)


def near_fault(rule: Rule) -> Rule:
    return RhoTooSmall() if isinstance(rule, KSeqRule) else TooEager(rule)


@dataclass
class LawCheck:
    pvalue: float
    tokens: int  # draws pooled
    accepted: int  # tree tokens accepted over all steps
    steps: int


def root_draft_probs(drafter, text: list[int], params: SamplingParams, target_hidden: torch.Tensor) -> torch.Tensor:
    """q after every prefix text[:t + 1], t = 0..len(text) − 2, in one draft pass. [len(text) − 1, V]

    drafters.base.root_distributions gives the same rows position by position (one propose each);
    over thousands of positions one pass is what keeps these tests affordable."""
    lm = drafter.lm
    length = len(text)
    if getattr(drafter, "uses_target_features", False):  # entry j reads (h_{j−1}, x_j) at position j
        logits = lm.forward(torch.tensor([text[1:-1]]), torch.arange(1, length - 1), lm.new_cache(length),
                            features=target_hidden[None, : length - 2]).logits[0]
        first = torch.full_like(logits[:1], float("nan"))  # the first prefix has no entry: not pooled
        logits = torch.cat([first, logits])
    else:
        logits = lm.forward(torch.tensor([text[:-1]]), torch.arange(length - 1), lm.new_cache(length)).logits[0]
    return logits_to_probs(logits, params)


def sharp_support(logits: torch.Tensor, params: SamplingParams, margin: float = 1e-4) -> torch.Tensor:
    """Which rows of logits [n, V] keep the same top-k / top-p support under a change of `margin`.

    The decoder's tree pass and a fresh pass over the text agree to ~1e-6, not bit for bit, so a
    near-tie at the edge of the kept set can fall either way; such positions say nothing about
    exactness and are left out. [n] bool
    """
    scaled = logits.double() / params.temperature
    values = scaled.sort(-1, descending=True).values  # [n, V]
    sharp = torch.ones(logits.shape[0], dtype=torch.bool)
    if 0 < params.top_k < logits.shape[-1]:
        sharp &= values[:, params.top_k - 1] - values[:, params.top_k] > margin
    if params.top_p < 1:
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        kept = (before < params.top_p).sum(-1)  # [n] size of the nucleus
        edge = before.gather(-1, kept[:, None].clamp(max=logits.shape[-1] - 1))[:, 0]
        last = before.gather(-1, (kept[:, None] - 1))[:, 0]
        gap = values.gather(-1, (kept[:, None] - 1))[:, 0] - values.gather(-1, kept[:, None].clamp(
            max=logits.shape[-1] - 1))[:, 0]
        sharp &= ((edge - params.top_p).abs() > margin) & ((last - params.top_p).abs() > margin) & (gap > margin)
    return sharp


def reference_probs(logits: torch.Tensor, text: list[int], prompt: int, params: SamplingParams) -> torch.Tensor:
    """p after every prefix text[:t + 1] from one pass's logits [len(text) − 1, V], the logit bias and the
    penalties applied from their definitions (counts of the generated tokens text[prompt : t + 1], the set of
    every token in text[: t + 1]), written apart from processing.py's; then temperature, top-k, top-p."""
    logits = logits.double().clone()
    for token, bias in params.logit_bias:
        logits[:, token] += bias
    vocab = logits.shape[-1]
    ones = torch.nn.functional.one_hot(torch.tensor(text[: logits.shape[0]]), vocab).double()  # token t at row t
    seen = ones.cumsum(0) > 0
    generated = ones.clone()
    generated[: prompt] = 0
    counts = generated.cumsum(0)
    penalty = params.repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).double()
    plain = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    return logits_to_probs(logits, plain).double()


def check_decoder_law(target, drafter, settings: DecodeSettings, params: SamplingParams, rule: Rule | None = None,
                      streams: int = 12, tokens: int = 200, seed: int = 0, profile=None,
                      repeats: int = 0, loads=None) -> LawCheck:
    """Generate `streams` texts of `tokens` tokens and test every emitted token against p(·|prefix).

    repeats: also split each category by whether the token is among the prefix's last `repeats` tokens
    (where a penalty that miscounts a tree path moves mass). loads: step number -> the BatchLoad that
    step is prepared beside (a batch's rest, for tree 'auto'), or None: decoded alone."""
    decoder = Decoder(target, drafter, settings, params, profile)
    if rule is not None:
        decoder.rule = rule
    generator = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    categories, laws, accepted, steps = [], [], 0, 0
    for stream in range(streams):
        prompt = torch.randint(0, vocab, (3,), generator=generator).tolist()
        text = list(prompt)
        for step in (decoder.stream(prompt, tokens, generator) if loads is None
                     else _beside(decoder, prompt, tokens, generator, loads, steps)):
            text.extend(step.emitted)
            accepted += step.accepted
            steps += 1
        out = target.forward(torch.tensor([text[:-1]]), torch.arange(len(text) - 1), target.new_cache(len(text)))
        target_probs = reference_probs(out.logits[0], text, len(prompt), params)  # [len − 1, V] after text[:t + 1]
        # q only sorts the draws into categories (any function of the prefix will do): without penalties
        plain = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        draft_probs = root_draft_probs(drafter, text, plain, out.hidden[0]).double()
        rows = torch.arange(len(prompt) - 1, len(text) - 1)  # the generated tokens' prefixes
        rows = rows[~draft_probs[rows, 0].isnan()]
        emitted = torch.tensor(text)[rows + 1]
        p, q = target_probs[rows], draft_probs[rows]
        sharp = sharp_support(out.logits[0, rows], params)  # [n] positions whose support is well defined
        emitted, p, q = emitted[sharp], p[sharp], q[sharp]
        if bool((p.gather(-1, emitted[:, None]) == 0).any()):
            return LawCheck(0.0, emitted.numel(), accepted, steps)  # a token the target cannot emit
        bins = torch.bucketize((q / p).log2(), RATIO_EDGES.double())  # [n, V]; p = 0 entries carry no mass
        if repeats:
            kept = rows[sharp]
            recent = torch.zeros_like(p, dtype=torch.bool)
            for back in range(repeats):  # the prefix of row t ends with text[t], text[t − 1], ...
                recent[torch.arange(kept.numel()), torch.tensor(text)[(kept - back).clamp(min=0)]] = True
            bins = bins + (RATIO_EDGES.numel() + 1) * recent.long()
        categories.append(bins.gather(-1, emitted[:, None])[:, 0])
        laws.append(torch.zeros(emitted.numel(), (RATIO_EDGES.numel() + 1) * (2 if repeats else 1),
                                dtype=torch.float64).scatter_add_(
            -1, bins, torch.where(p > 0, p, 0)))
    return LawCheck(pooled_chi_square_pvalue(torch.cat(categories), torch.cat(laws)),
                    sum(c.numel() for c in categories), accepted, steps)


def _beside(decoder, prompt, tokens, generator, loads, first_step):
    """Decoder.stream's steps with each step prepared beside loads(step number)."""
    generation = decoder.start(prompt, tokens, generator)
    for _ in generation.prefill():
        pass
    step = first_step
    while not generation.finished:
        target_pass = generation.prepare(loads(step))
        out = decoder.target.forward(target_pass.tokens[None], target_pass.positions, generation.cache,
                                     **target_pass.options(decoder._capture_kwargs))
        yield generation.complete(out, 0.0)
        step += 1
