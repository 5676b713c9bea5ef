"""The public Python entry points: load models once, then stream or generate text.

    import spectr
    engine = spectr.load()                                  # SmolLM2-135M-Instruct, n-gram drafts
    for chunk in spectr.stream(engine, "Write a haiku about caches.", chat=True, seed=0):
        print(chunk.text, end="")
    result = spectr.generate(engine, "def fib(n):", temperature=0, max_new_tokens=64)
    result.text, result.stats.block_efficiency

One streaming generator is the core; `generate`, the CLI and the server are
thin adapters over it.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
import random
import time
from pathlib import Path

import torch

from spectr.detokenize import IncrementalText
from spectr.decoding import Decoder, StepStats
from spectr.planner import MAX_AUTO_LENGTH, CostProfile, cached_profile, measure_profile
from spectr.drafters import EagleDrafter, ModelDrafter, NgramDrafter
from spectr.drafters.self_draft import SelfDraft, SelfDrafter, is_self_draft, parse_self_draft, parse_sparq
from spectr.errors import InvalidInputError, SpectrError, UnsupportedModelError
from spectr.models import LlamaForward, LoadedModel, check_same_tokenizer, load_model
from spectr.models.approximate import SparQForward, check_sparse
from spectr.models.attention import SparQ
from spectr.models.loading import ModelSource, stop_token_ids
from spectr.precisions import DEFAULT_DRAFT_PRECISION, DEFAULT_PRECISION
from spectr.processing import TokenLogprob
from spectr.settings import GenerationSettings

NGRAM = "ngram"
DEFAULT_DRAFT = "default"
DEFAULT_DRAFT_NAME = "smollm2-135m-instruct"


@dataclass
class Engine:
    """A loaded target and draft, ready for any number of generations (one at a time)."""

    target: LoadedModel
    draft: LoadedModel | None  # None: n-gram (prompt lookup) drafts, or the target itself (self_draft)
    self_draft: SelfDraft | None = None  # the target with layers skipped and/or SparQ attention
    approximate: SparQ | None = None  # opt-in approximate mode: SparQ attention in the target's decoding passes
    _profiles: dict = field(default_factory=dict, repr=False)

    def cost_profile(self, max_length: int = MAX_AUTO_LENGTH, refresh: bool = False) -> CostProfile:
        """What a step costs here (planner.py), for tree 'auto': measured once per machine, model, draft and
        thread count (~6 s here, most of it the long context), then read from spectr's cache folder."""
        slot = (max_length, torch.get_num_threads())  # the machine itself does not change under a process
        if refresh or slot not in self._profiles:
            from spectr import __version__
            from spectr.checks import machine
            from spectr.models import kernels

            key = (f"{self.describe()} | {machine().describe()} | threads {slot[1]} | L {max_length} | "
                   f"spectr {__version__} | kernels {kernels.source_digest()} | contexts short and long, batched rows and sequences, head, overheads")
            self._profiles[slot] = cached_profile(key, lambda: measure_profile(
                self.target.lm, self.drafter(), max_length, description=self.describe(paths=False)), refresh)
        return self._profiles[slot]

    @property
    def tokenizer(self):
        return self.target.tokenizer

    def sibling(self, draft: str | Path | None = None, approximate: str | None = None) -> "Engine":
        """Another engine over this one's loaded target: with another draft (as `load` names them), or in an
        approximate mode (as `load`'s approximate)."""
        if approximate is not None:
            return Engine(target=self.target, draft=None, approximate=_approximation(self.target.lm, approximate))
        if is_self_draft(draft):
            return Engine(target=self.target, draft=None,
                          self_draft=parse_self_draft(str(draft), self.target.lm.config.num_layers))
        return Engine(target=self.target, draft=_load_draft(draft, self.target, DEFAULT_DRAFT_PRECISION))

    def target_forward(self):
        """What decoding runs as the target: its forward, or in the approximate mode that forward with SparQ
        attention (models/approximate.py: not the target's exact law)."""
        return self.target.lm if self.approximate is None else SparQForward(self.target.lm, self.approximate)

    def drafter(self):
        if self.self_draft is not None:
            return SelfDrafter(self.target.lm, self.self_draft.skip, self.self_draft.sparse)
        if self.draft is None:
            return NgramDrafter()
        if getattr(self.draft.lm, "feature_projection", None) is not None:
            return EagleDrafter(self.draft.lm)
        return ModelDrafter(self.draft.lm)

    def describe(self, paths: bool = True) -> str:
        """Which target and draft run, how; paths=False names them without this machine's paths (for results)."""
        def name(model: LoadedModel) -> str:
            return str(model.source) if paths else model.source.name

        if self.self_draft is not None:
            draft = self.self_draft.describe(self.target.lm.config.num_layers)
        elif self.draft is None:
            draft = "n-gram lookup"
        else:
            draft = f"{name(self.draft)} ({self.draft.lm.backend}, {self.draft.lm.precision})"
        described = f"target {name(self.target)} ({self.target.lm.backend}, {self.target.lm.precision}); draft {draft}"
        return described if self.approximate is None else f"{described}; {self.target_forward().describe()}"


def load(
    target: str | Path | None = None,
    draft: str | Path | None = DEFAULT_DRAFT,
    precision: str = DEFAULT_PRECISION,
    draft_precision: str | None = None,
    compile: bool = False,
    approximate: str | None = None,
) -> Engine:
    """Load the target (default: SmolLM2-135M-Instruct) and a draft: 'default' (the trained draft
    shipped for the default target, n-gram lookups otherwise), 'ngram', a trained draft folder, a model, or
    the target itself, cheaper: 'self-skip' (its middle third of layers skipped) or 'self-skip:<layers>'
    (e.g. 'self-skip:8-21'), 'sparq' (SparQ attention over the older context) or 'sparq:<rank>,<keep>',
    or both joined by '+' (drafters/self_draft.py).

    draft_precision: the draft's (default int4, DEFAULT_DRAFT_PRECISION: cheapest at equal acceptance).
    compile: run the target through torch.compile (fp32/bf16; ~40 s per shape bucket on first use).
    approximate: 'sparq' or 'sparq:<rank>,<keep>': an APPROXIMATE mode, the target's decoding passes with SparQ
    attention (faster at long contexts; not the target's exact law; models/approximate.py).
    """
    if approximate is not None:
        parse_sparq(approximate)  # a bad spec is named before anything loads
        if compile:
            raise UnsupportedModelError("the approximate mode changes spectr's own forward; --compile replaces it")
    engine = _load(target, draft, precision, draft_precision, compile)
    if approximate is not None:
        engine.approximate = _approximation(engine.target.lm, approximate)
    return engine


def _approximation(lm, spec: str) -> SparQ:
    """The SparQ an approximate-mode spec names, for a target forward that can run it."""
    check_sparse(lm)
    return parse_sparq(spec)


def _load(target, draft, precision, draft_precision, compile) -> Engine:
    target_model = load_model(target, precision=precision)
    if is_self_draft(draft):
        if not getattr(target_model.lm, "supports_skip", False):
            raise UnsupportedModelError(f"a self-draft needs spectr's own forward; {target_model.source.name} runs "
                                        f"through {target_model.lm.backend}")
        if compile:
            raise UnsupportedModelError("a self-draft skips layers of spectr's own forward; --compile replaces it")
        return Engine(target=target_model, draft=None,
                      self_draft=parse_self_draft(str(draft), target_model.lm.config.num_layers))
    draft_model = _load_draft(draft, target_model, draft_precision or DEFAULT_DRAFT_PRECISION)
    if compile:
        from spectr.models.compiled import CompiledForward

        if not isinstance(target_model.lm, LlamaForward):
            raise UnsupportedModelError("--compile needs spectr's own forward; this model runs through transformers")
        target_model.lm = CompiledForward(target_model.lm)
    return Engine(target=target_model, draft=draft_model)


def shipped_draft(target: LoadedModel) -> Path | None:
    """The trained draft shipped for this target, if there is one (today: the default target's)."""
    from spectr.drafters.trained import is_trained_draft
    from spectr.models.loading import default_model_source

    try:
        if target.source != default_model_source():
            return None
    except SpectrError:
        return None
    folder = Path(__file__).parent / "drafts" / DEFAULT_DRAFT_NAME
    return folder if is_trained_draft(folder) else None


def _load_draft(draft: str | Path | None, target: LoadedModel, precision: str) -> LoadedModel | None:
    """None for n-gram drafts; 'default': the shipped trained draft of this target, else n-gram;
    a trained draft folder (built around the target); or any model with the target's tokenizer."""
    if str(draft) == DEFAULT_DRAFT:
        draft = shipped_draft(target) or NGRAM
    if draft is None or str(draft) == NGRAM:
        return None
    from spectr.drafters.trained import is_trained_draft, load_trained_draft

    if is_trained_draft(draft):
        lm = load_trained_draft(draft, target, precision)
        return LoadedModel(lm=lm, tokenizer=target.tokenizer, source=ModelSource(folder=Path(draft), gguf_file=None))
    draft_model = load_model(draft, precision=precision)
    check_same_tokenizer(target.tokenizer, draft_model.tokenizer)
    return draft_model


@dataclass
class GenerationStats:
    steps: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # steps that accepted ≥ i+1 tree tokens
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    select_seconds: float = 0.0
    seconds: float = 0.0  # the whole generation, the prompt's pass included
    prefill_seconds: float = 0.0  # the prompt's pass
    shapes: dict[str, int] = field(default_factory=dict)  # steps per drafted shape ("plain", "L=2", ...)

    @property
    def block_efficiency(self) -> float:
        """Emitted tokens per target forward."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of the whole generation (the prompt's pass included)."""
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second of decoding alone (after the prompt's pass), as llama.cpp's eval rate."""
        decoding = self.seconds - self.prefill_seconds
        return self.new_tokens / decoding if decoding > 0 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.new_tokens += len(step.emitted)
        for position in range(step.accepted):
            if position == len(self.accepted_per_position):
                self.accepted_per_position.append(0)
            self.accepted_per_position[position] += 1
        self.draft_seconds += step.draft_seconds
        self.verify_seconds += step.verify_seconds
        self.select_seconds += step.select_seconds
        self.shapes[step.shape] = self.shapes.get(step.shape, 0) + 1

    def summary(self) -> str:
        overhead = self.seconds - self.prefill_seconds - self.draft_seconds - self.verify_seconds - self.select_seconds
        return (
            f"prompt {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s "
            f"({self.prompt_tokens_per_second:.0f} tok/s); {self.new_tokens} tokens in "
            f"{self.seconds - self.prefill_seconds:.2f} s ({self.decode_tokens_per_second:.1f} tok/s decoding, "
            f"{self.tokens_per_second:.1f} with the prompt), "
            f"{self.steps} target passes, block efficiency {self.block_efficiency:.2f}; "
            f"draft {self.draft_seconds:.2f} s, verify {self.verify_seconds:.2f} s, "
            f"select {self.select_seconds:.2f} s, other {max(overhead, 0.0):.2f} s; "
            f"steps by shape: {', '.join(f'{shape} {count}' for shape, count in self.shapes.items())}"
        )


@dataclass
class Chunk:
    """A piece of streamed output: new text, the tokens behind it, and the step's stats."""

    text: str
    tokens: list[int]
    step: StepStats
    stats: GenerationStats
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: GenerationStats
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None  # per token, when asked for (logprobs=N)


def encode_prompt(engine: Engine, prompt: str | list[int] | list[dict], chat: bool) -> list[int]:
    """Token ids of a prompt: raw text, a chat (messages, or text as one user turn), or ids."""
    tokenizer = engine.tokenizer
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
        return list(prompt)
    if chat or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInputError("this model's tokenizer has no chat template; pass plain text without --chat")
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    if not isinstance(prompt, str):
        raise InvalidInputError(f"prompt must be text, token ids or chat messages, got {type(prompt).__name__}")
    return list(tokenizer(prompt, add_special_tokens=False).input_ids)


def stream(engine: Engine, prompt: str | list[int] | list[dict], settings: GenerationSettings | None = None, *,
           chat: bool = False, **options) -> Iterator[Chunk]:
    """Sample a continuation of `prompt` exactly from the target, streaming text as steps finish.

    settings: a GenerationSettings, or none and its options as keywords (GenerationSettings.build: method,
    rule, k, L, tree, budget, temperature, top_k, top_p, presence_penalty, frequency_penalty,
    repetition_penalty, logit_bias, seed, max_new_tokens, stop, logprobs). The tree is 'auto' by default (one
    draft path a step, its length up to L chosen from this machine's measured costs and the acceptance seen
    so far), 'iid' (k drafts of L tokens) when k or L is given, or 'dynamic' (a node `budget`).
    chat: wrap a text prompt in the chat template as one user turn (messages always are).
    """
    if settings is None:
        settings = GenerationSettings.build(**options)
    elif options:
        raise InvalidInputError(f"give a GenerationSettings or its options, not both (got {', '.join(options)})")
    ids = encode_prompt(engine, prompt, chat)
    decoder, generator = make_decoder(engine, settings)
    chunks = Chunks(engine, settings, len(ids))
    for step in decoder.stream(ids, settings.max_new_tokens, generator, chunks.stop_ids):
        chunk = chunks.add(step, decoder.prefill_seconds)
        yield chunk
        if chunk.finished:
            return


def make_decoder(engine: Engine, settings: GenerationSettings) -> tuple[Decoder, torch.Generator]:
    """A decoder for one generation of `settings` on `engine` (its own drafter), and its random generator."""
    decode = settings.decode
    seed = settings.seed
    generator = torch.Generator().manual_seed(random.randrange(2**63) if seed is None else seed)
    profile = engine.cost_profile(decode.length) if decode.tree == "auto" else None
    decoder = Decoder(engine.target_forward(), engine.drafter() if decode.method != "ar" else None, decode,
                      settings.sampling, profile, logprobs=settings.logprobs)
    return decoder, generator


class Chunks:
    """A generation's steps as the Chunks it streams: text decoded incrementally, stop strings found across
    token boundaries (a step cut at the token that completes one), the running stats."""

    def __init__(self, engine: Engine, settings: GenerationSettings, prompt_tokens: int):
        self.stops, self.max_new_tokens = settings.stop, settings.max_new_tokens
        self.stats = GenerationStats(prompt_tokens=prompt_tokens)
        self.stop_ids = stop_token_ids(engine.tokenizer)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # a stop string may still be forming
        self.text = IncrementalText(engine.tokenizer, hidden=self.stop_ids, keep=self.hold)
        self.shown = 0  # characters already streamed
        self.start = time.perf_counter()

    def add(self, step: StepStats, prefill_seconds: float) -> Chunk:
        """The chunk of this step (finished where the generation ends with it)."""
        text, stops, stats, hold = self.text, self.stops, self.stats, self.hold
        # Only the end of the text is decoded and searched: a stop string completes in this step's
        # text, reaching back at most `hold` characters. `base` is where `window` starts in the text.
        base = text.length - len(text.recent)
        window = text.recent + text.pending(step.emitted)
        if any(s in window for s in stops):
            # A stop string ends the generation at the token that completes it, as decoding one
            # token at a time would: later tokens of this step are dropped from tokens and stats.
            for count in range(1, len(step.emitted) + 1):
                window = text.recent + text.pending(step.emitted[:count])
                if any(s in window for s in stops):
                    step.truncate(count)
                    break
        stats.add(step)
        stats.seconds = time.perf_counter() - self.start
        stats.prefill_seconds = prefill_seconds
        cut = min((window.find(s) for s in stops if s in window), default=-1)
        ended_by_eos = step.emitted[-1] in self.stop_ids
        if cut >= 0 or ended_by_eos or stats.new_tokens >= self.max_new_tokens:
            end = cut if cut >= 0 else len(window)
            reason = "stop" if (cut >= 0 or ended_by_eos) else "length"
            return Chunk(window[self.shown - base : end], step.emitted, step, stats, finished=True,
                         finish_reason=reason)
        visible = max(self.shown, base + len(window) - hold)
        chunk = Chunk(window[self.shown - base : visible - base], step.emitted, step, stats)
        self.shown = visible
        text.extend(step.emitted)
        return chunk


def generate(engine: Engine, prompt: str | list[int] | list[dict], settings: GenerationSettings | None = None,
             **options) -> GenerationResult:
    """`stream`, collected."""
    pieces, tokens, logprobs, stats, reason = [], [], [], GenerationStats(), "length"
    chunk = None
    for chunk in stream(engine, prompt, settings, **options):
        pieces.append(chunk.text)
        tokens.extend(chunk.tokens)
        logprobs.extend(chunk.step.logprobs or [])
        stats = chunk.stats
        reason = chunk.finish_reason or reason
    asked = chunk is not None and chunk.step.logprobs is not None
    return GenerationResult(text="".join(pieces), tokens=tokens, stats=stats, finish_reason=reason,
                            logprobs=logprobs if asked else None)
