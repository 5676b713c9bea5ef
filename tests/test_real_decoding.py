"""SpecTr decoding on the real default target: greedy output identical to plain greedy decoding."""

import pytest
import torch

from spectr.api import encode_prompt
from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import ModelDrafter, NgramDrafter
from spectr.models import native_forward
from spectr.planner import CostProfile
from spectr.processing import SamplingParams

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def target(real_model):
    return native_forward(real_model[0], "fp32")


@pytest.fixture(scope="module")
def prompt(real_model):
    tokenizer = real_model[1]
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
    return tokenizer(code).input_ids


def run(target, drafter, settings, prompt, tokens=24):
    decoder = Decoder(target, drafter, settings, SamplingParams(temperature=0))
    steps = list(decoder.stream(prompt, tokens, torch.Generator().manual_seed(0)))
    return [t for step in steps for t in step.emitted], len(steps)


def test_greedy_spectr_equals_greedy_target(target, prompt):
    plain, plain_steps = run(target, None, DecodeSettings(method="ar"), prompt)
    for k in (1, 2, 4):
        for length in (1, 3, 5):
            spec, steps = run(target, NgramDrafter(), DecodeSettings(k=k, length=length), prompt)
            assert spec == plain, (k, length)
            assert steps <= plain_steps
    # A model draft too (the target itself as its own draft: every token accepted).
    spec, steps = run(target, ModelDrafter(target), DecodeSettings(k=2, length=3), prompt)
    assert spec == plain and steps == 6


def test_the_shipped_draft_is_the_default_and_decodes_exactly(real_model, prompt):
    """Offline: the trained head shipped in the package is the default draft of the default target."""
    import spectr
    from spectr.api import shipped_draft
    from spectr.drafters import EagleDrafter
    from spectr.drafters.trained import load_trained_draft
    from spectr.models.loading import LoadedModel, ModelSource, default_model_source

    hf_model, tokenizer = real_model
    source = default_model_source()
    target_model = LoadedModel(lm=native_forward(hf_model, "fp32"), tokenizer=tokenizer, source=source,
                               transformers_model=hf_model)
    folder = shipped_draft(target_model)
    assert folder is not None, "no trained draft is shipped for the default target"
    draft = load_trained_draft(folder, hf_model, precision="fp32")
    engine = spectr.Engine(target=target_model,
                           draft=LoadedModel(lm=draft, tokenizer=tokenizer, source=ModelSource(folder, None)))
    assert isinstance(engine.drafter(), EagleDrafter)
    plain, _ = run(engine.target.lm, None, DecodeSettings(method="ar"), prompt, tokens=32)
    for k, length in ((1, 4), (4, 4)):
        spec, steps = run(engine.target.lm, engine.drafter(), DecodeSettings(k=k, length=length), prompt, tokens=32)
        assert spec == plain, (k, length)
        assert steps < 30  # the trained head is accepted along the way


CHAT_PROMPTS = [
    "Name the capital cities of five European countries, with one fact about each.",
    "Which is the longest river in Europe? Answer in a few sentences.",
    "Write a short Python function that checks whether a number is prime.",
]


@pytest.fixture(scope="module")
def default_engine():
    import spectr

    return spectr.load()  # the defaults: the GGUF target at native precision and the shipped draft


@pytest.mark.parametrize("shape", [(1, 4), (2, 3), (4, 2)])
def test_greedy_spectr_equals_greedy_decoding_at_the_default_precision(default_engine, shape):
    """Bitwise-stable verification: a tree pass gives each position the logits a one-token step gives it, so
    greedy speculative text is greedy text at native precision, on chat prompts, with the shipped draft."""
    engine = default_engine
    assert engine.target.lm.precision == "native"
    k, length = shape
    for message in CHAT_PROMPTS:
        prompt = encode_prompt(engine, message, chat=True)
        plain, plain_steps = run(engine.target.lm, None, DecodeSettings(method="ar"), prompt, tokens=48)
        spec, steps = run(engine.target.lm, engine.drafter(), DecodeSettings(k=k, length=length), prompt, tokens=48)
        assert spec == plain, (message, shape)
        assert steps < plain_steps  # the draft was accepted along the way


# Every tree must drive the same draft cache and the same target cache: the shapes beyond K-SEQ too. The
# planner's profile here makes drafting pay, so tree 'auto' really drafts (the machine's own would not).
DRAFTING_PROFILE = CostProfile(target_seconds=tuple(0.010 + 0.001 * n for n in range(7)),
                               draft_seconds=tuple(0.0005 * (n + 1) for n in range(6)))


@pytest.mark.parametrize("settings", [DecodeSettings(method="sd", rule="block", length=4),
                                      DecodeSettings(k=2, length=4, tree="dynamic", budget=6),
                                      DecodeSettings(tree="auto", length=4),
                                      DecodeSettings(k=3, length=3, tree="greedy"),
                                      DecodeSettings(k=3, length=3, rule="importance")],
                         ids=["block", "dynamic", "auto", "greedy", "importance"])
def test_greedy_equals_greedy_decoding_with_every_tree(default_engine, settings):
    engine = default_engine
    for message in CHAT_PROMPTS[:2]:
        prompt = encode_prompt(engine, message, chat=True)
        plain, plain_steps = run(engine.target.lm, None, DecodeSettings(method="ar"), prompt, tokens=40)
        decoder = Decoder(engine.target.lm, engine.drafter(), settings, SamplingParams(temperature=0),
                          DRAFTING_PROFILE if settings.tree == "auto" else None)
        steps = list(decoder.stream(prompt, 40, torch.Generator().manual_seed(0)))
        assert [t for s in steps for t in s.emitted] == plain, (message, settings)
        if settings.tree == "auto":  # plain steps and drafted ones, mixed as the planner saw fit
            assert {s.shape for s in steps} > {"plain"} or all(s.shape != "plain" for s in steps)
        else:
            assert len(steps) < plain_steps


def test_the_shipped_draft_is_not_offered_to_transformers(default_engine):
    """The bench's assisted-generation peer needs a draft transformers can load; spectr's own draft format is
    refused with a reason, not a tokenizer crash."""
    from spectr.bench.runner import Method, Peers
    from spectr.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="spectr's own draft format"):
        default_engine.draft.hf_model
    reason = Peers(default_engine, None).unavailable(Method(name="hf assisted L=2", family="hf", kind="assisted", length=2))
    assert reason is not None and "transformers can load" in reason


PENALTIES = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3)


def test_greedy_with_penalties_equals_greedy_decoding_with_them(default_engine):
    """Penalties count each tree node's path, in target and draft alike: greedy speculative text is still
    greedy text, and the penalties change it."""
    engine = default_engine
    params = SamplingParams(temperature=0, logit_bias=((28, -5.0),), **PENALTIES)
    for message in CHAT_PROMPTS[:2]:
        prompt = encode_prompt(engine, message, chat=True)
        plain = Decoder(engine.target.lm, None, DecodeSettings(method="ar"), params)
        expected = [t for s in plain.stream(prompt, 40, torch.Generator().manual_seed(0)) for t in s.emitted]
        unpenalized, _ = run(engine.target.lm, None, DecodeSettings(method="ar"), prompt, tokens=40)
        assert expected != unpenalized
        for settings in (DecodeSettings(k=2, length=3), DecodeSettings(k=2, length=3, tree="dynamic", budget=6)):
            decoder = Decoder(engine.target.lm, engine.drafter(), settings, params)
            steps = list(decoder.stream(prompt, 40, torch.Generator().manual_seed(0)))
            assert [t for s in steps for t in s.emitted] == expected, (message, settings)
            assert len(steps) < 40


def test_logprobs_are_the_targets_processed_law_bit_for_bit(default_engine):
    """Each emitted token's reported logprob (and top tokens) equals the processed law of a one-token pass at
    its prefix, bit for bit at native precision: the verification pass's rows are the model's own."""
    from dataclasses import replace

    from spectr.processing import TokenHistory, logits_to_probs, token_logprob

    engine = default_engine
    lm = engine.target.lm
    params = SamplingParams(temperature=0.8, top_k=40, **PENALTIES)
    prompt = encode_prompt(engine, CHAT_PROMPTS[2], chat=True)
    decoder = Decoder(lm, engine.drafter(), DecodeSettings(k=2, length=3), params, logprobs=3)
    steps = list(decoder.stream(prompt, 32, torch.Generator().manual_seed(1)))
    reported = [entry for step in steps for entry in step.logprobs]
    emitted = [t for step in steps for t in step.emitted]
    assert [entry.token for entry in reported] == emitted and max(s.accepted for s in steps) > 0
    cache = lm.new_cache(len(prompt) + len(emitted) + 1)
    lm.forward(torch.tensor([prompt[:-1]]), torch.arange(len(prompt) - 1), cache,
               logit_indices=torch.tensor([], dtype=torch.long))
    history = TokenHistory(lm.config.vocab_size, prompt)
    law, text = replace(params, history=history), list(prompt)
    for entry in reported:
        logits = lm.forward(torch.tensor([[text[-1]]]), torch.tensor([len(text) - 1]), cache).logits[0]
        assert token_logprob(logits_to_probs(logits, law)[0], entry.token, 3) == entry
        text.append(entry.token)
        history.extend([entry.token])
