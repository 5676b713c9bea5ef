"""The EAGLE-style draft head: training matches drafting, decoding stays exact, the recipe runs end to end."""

import json

import pytest
import torch

import spectr
from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import EagleDrafter, ModelDrafter
from spectr.errors import UnsupportedModelError
from spectr.drafters.trained import load_trained_draft, target_identity
from spectr.models import native_forward
from spectr.models.llama import rotary_tables
from spectr.processing import SamplingParams
from spectr.training.eagle import EagleConfig, EagleHead, export, run_recipe
from spectr.training.samples import DataRecipe
from tests.models.test_loading import save_tiny_model
from tests.models.tiny import VOCAB, tiny_model
from tests.stats import P_VALUE_THRESHOLD, chi_square_pvalue

PROMPT = [3, 17, 42, 8, 25, 3, 17]


@pytest.fixture(scope="module")
def hf_target():
    return tiny_model("llama-gqa", seed=0, initializer_range=0.3)


def _random_head(hf_target, folder, scale: float):
    """A random head (weights rounded to bf16, as shipped) over a reduced vocabulary, exported."""
    torch.manual_seed(3)
    head = EagleHead(hf_target.config, rotary_tables(hf_target.config, 256))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_((parameter * scale).to(torch.bfloat16).float())
    kept = torch.arange(0, VOCAB, 2)  # every other token: q is zero on the rest
    export(head, kept, EagleConfig(), [], folder, target_identity(hf_target))
    return folder, head, kept


@pytest.fixture(scope="module")
def head_folder(hf_target, tmp_path_factory):
    return _random_head(hf_target, tmp_path_factory.mktemp("head"), scale=3.0)  # large weights: a peaked q


def _run(target, drafter, settings, params, prompt=PROMPT, tokens=20, seed=0):
    decoder = Decoder(target, drafter, settings, params)
    steps = list(decoder.stream(prompt, tokens, torch.Generator().manual_seed(seed)))
    return [t for step in steps for t in step.emitted], steps


def test_training_unroll_matches_drafting(hf_target, head_folder):
    """Depth r of the unrolled training pass = the r-th draft token's distribution while drafting."""
    folder, head, kept = head_folder
    target = native_forward(hf_target, "fp32")
    draft = load_trained_draft(folder, hf_target, precision="fp32")
    text = PROMPT
    features = target.forward(torch.tensor([text]), torch.arange(len(text)), target.new_cache(32)).hidden[0]
    drafter = EagleDrafter(draft)
    drafter.reset(64)
    drafter.observe(features[:-1])
    tree = drafter.propose(text, 1, 3, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    chain = text + tree.tokens[:2].tolist()  # the root, then the first two draft tokens
    # Entries e = 0.. read (h_e, x_{e+1}) at position e + 1; entries past the root read predictions.
    entries = len(chain) - 1
    inputs = torch.zeros(1, entries, features.shape[-1])
    inputs[0, : len(text) - 1] = features[:-1]
    with torch.no_grad():
        outputs = head.unrolled(inputs, target.embed(torch.tensor(chain[1:]))[None],
                                torch.arange(1, entries + 1)[None], torch.ones(1, entries, dtype=torch.bool), 3)
    rows = hf_target.get_output_embeddings().weight[kept]
    root_entry = len(text) - 2
    for depth in range(3):
        q = (outputs[depth][0, root_entry + depth] @ rows.T).softmax(-1)
        torch.testing.assert_close(tree.draft_probs[depth][kept], q, atol=1e-4, rtol=0)
        assert float(tree.draft_probs[depth].sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(tree.draft_probs[0][1::2].sum()) == 0.0  # nothing outside the kept tokens


@pytest.mark.parametrize("k,length", [(1, 1), (1, 4), (3, 2), (4, 4)])
@pytest.mark.parametrize("prompt", [PROMPT, [5]], ids=["prompt", "one-token"])
def test_greedy_equals_plain_greedy(hf_target, head_folder, k, length, prompt):
    target = native_forward(hf_target, "fp32")
    draft = load_trained_draft(head_folder[0], hf_target, precision="fp32")
    greedy = SamplingParams(temperature=0)
    plain, _ = _run(target, None, DecodeSettings(method="ar"), greedy, prompt=prompt, tokens=24)
    method = "sd" if k == 1 else "spectr"
    spec, _ = _run(target, EagleDrafter(draft), DecodeSettings(method=method, k=k, length=length), greedy,
                   prompt=prompt, tokens=24)
    assert spec == plain


def test_the_head_holds_the_targets_features_of_the_committed_text(hf_target, head_folder):
    """After decoding, the head has the target's fresh features of every committed token and a cache
    equal to a fresh pass over them: accepted drafts were re-entered with true, not predicted, features."""
    target = native_forward(hf_target, "fp32")
    draft = load_trained_draft(head_folder[0], hf_target, precision="fp32")
    drafter = EagleDrafter(draft)
    tokens, steps = _run(target, drafter, DecodeSettings(k=3, length=3), SamplingParams(temperature=1.0), tokens=30)
    assert sum(step.accepted for step in steps) > 0
    text = PROMPT + tokens
    fresh = target.forward(torch.tensor([text]), torch.arange(len(text)), target.new_cache(64)).hidden[0]
    assert drafter.known == len(text) - 1
    torch.testing.assert_close(drafter.features[: drafter.known], fresh[:-1], atol=1e-5, rtol=0)
    entries = drafter.entries
    cache = draft.new_cache(64)
    draft.forward(torch.tensor([text[1 : entries + 1]]), torch.arange(1, entries + 1), cache,
                  features=fresh[None, :entries])
    assert drafter.cache.length == entries
    # fp32 float noise (dense matmuls over other row counts); the control below shows what a wrong
    # feature does: features one position off move the keys by orders of magnitude more.
    torch.testing.assert_close(drafter.cache.keys[:, :, :, :entries], cache.keys[:, :, :, :entries],
                               atol=1e-4, rtol=1e-4)
    shifted = draft.new_cache(64)
    draft.forward(torch.tensor([text[1 : entries + 1]]), torch.arange(1, entries + 1), shifted,
                  features=fresh[None, 1 : entries + 1])
    assert float((shifted.keys[:, :, :, 1:entries] - cache.keys[:, :, :, 1:entries]).abs().max()) > 1e-2


class _MisreportingDrafter(EagleDrafter):
    """Negative control: samples from q but tells the rule a different q (sharper, renormalised)."""

    def propose(self, *args, **kwargs):
        tree = super().propose(*args, **kwargs)
        sharper = tree.draft_probs**2
        tree.draft_probs = sharper / sharper.sum(-1, keepdim=True).clamp(min=1e-30)
        return tree


@pytest.mark.parametrize("drafter_class,exact", [(EagleDrafter, True), (_MisreportingDrafter, False)],
                         ids=["head", "misreported-q"])
def test_sampling_with_the_head_follows_the_target(hf_target, tmp_path, drafter_class, exact):
    """Chi-square of the first two tokens (k = 3, L = 2, T = 1) against the target's exact law."""
    target = native_forward(hf_target, "fp32")
    folder, _, _ = _random_head(hf_target, tmp_path, scale=0.3)  # small weights: a flat q, often accepted
    draft = load_trained_draft(folder, hf_target, precision="fp32")
    params = SamplingParams(temperature=1.0)
    prompt = [5, 9]
    with torch.no_grad():
        first = target.forward(torch.tensor([prompt]), torch.arange(2), target.new_cache(4)).logits[0, -1].softmax(-1)
        both = torch.tensor([prompt[0], prompt[1], 0]).repeat(VOCAB, 1)
        both[:, 2] = torch.arange(VOCAB)
        second = target.forward(both, torch.arange(3), target.new_cache(4, batch=VOCAB)).logits[:, -1].softmax(-1)
    law = (first[:, None] * second).flatten().double()
    decoder = Decoder(target, drafter_class(draft), DecodeSettings(k=3, length=2), params)
    generator = torch.Generator().manual_seed(1)
    outcomes, accepted = [], 0
    for _ in range(3000):
        steps = list(decoder.stream(prompt, 2, generator))
        tokens = [t for step in steps for t in step.emitted]
        outcomes.append(tokens[0] * VOCAB + tokens[1])
        accepted += steps[0].accepted
    assert accepted > 300  # the draft takes part
    assert (chi_square_pvalue(torch.tensor(outcomes), law) > P_VALUE_THRESHOLD) == exact


def test_a_drafter_fed_wrong_features_is_caught(hf_target, head_folder):
    draft = load_trained_draft(head_folder[0], hf_target, precision="fp32")
    drafter = EagleDrafter(draft)
    drafter.reset(32)
    with pytest.raises(RuntimeError, match="features of 0 tokens; it needs 6"):
        drafter.propose(PROMPT, 2, 2, SamplingParams(), torch.Generator())


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    from tests.test_draft_data import TINY_TEMPLATE

    folder = save_tiny_model(tmp_path_factory.mktemp("target"), chat=TINY_TEMPLATE)
    output = tmp_path_factory.mktemp("eagle")
    config = EagleConfig(vocab=48, unroll=2, sequence=24, batch_tokens=64, steps=3, checkpoint_every=2,
                         eval_sequences=4)
    data = DataRecipe(tokens=300, rows=8, chunk_steps=40, max_answer_tokens=12, max_user_tokens=8, text_tokens=8,
                      max_text_tokens=12, min_kept_tokens=2, precision="fp32")
    final = run_recipe(str(folder), output, config, data, resume=False, log=lambda message: None)
    return folder, output, config, data, final


def test_recipe_samples_trains_checkpoints_and_resumes(recipe_run):
    folder, output, config, data, final = recipe_run
    assert final["step"] == 3 and set(final["acceptance"]) == {"T=1", "T=0.7", "greedy"}
    manifest = json.loads((output / "draft.json").read_text())
    assert manifest["format"] == "spectr-eagle-2" and manifest["samples"]["tokens"] == 300
    assert manifest["feature_layers"] == [0, 1] and manifest["samples"]["stored_tokens"] >= 300
    history = manifest["history"]
    assert [entry["step"] for entry in history] == [0, 2, 3]
    assert history[0]["acceptance"] != history[-1]["acceptance"]  # training moved the head
    best = max(history, key=lambda entry: entry["acceptance"]["T=1"][0])  # what export keeps
    assert manifest["exported_step"] == best["step"] and manifest["held_out_acceptance"] == best["acceptance"]
    assert (output / "learning-curve.png").is_file()
    shards = sorted((output / "samples").glob("shard-*.pt"))
    assert shards
    more = EagleConfig(**{**config.__dict__, "steps": 4})
    resumed = run_recipe(str(folder), output, more, data, resume=True, log=lambda message: None)
    assert resumed["step"] == 4
    assert sorted((output / "samples").glob("shard-*.pt")) == shards  # no resampling


def test_a_recipe_out_of_time_stops_while_sampling_and_goes_on(tmp_path):
    from tests.test_draft_data import TINY_TEMPLATE

    folder = save_tiny_model(tmp_path / "target", chat=TINY_TEMPLATE)
    data = DataRecipe(tokens=100_000, rows=4, chunk_steps=16, max_answer_tokens=8, text_tokens=6, max_text_tokens=8,
                      min_kept_tokens=2, precision="fp32")
    assert run_recipe(str(folder), tmp_path / "draft", EagleConfig(vocab=48), data, hours=0.0,
                      log=lambda message: None) is None
    assert not (tmp_path / "draft" / "draft.json").exists()


def test_recipe_output_loads_as_the_draft_and_decodes_exactly(recipe_run):
    folder, output, _, _, _ = recipe_run
    engine = spectr.load(folder, draft=output, precision="fp32")
    assert isinstance(engine.drafter(), EagleDrafter)
    plain = spectr.generate(engine, "w3 w5 w7", method="ar", temperature=0, max_new_tokens=16)
    spec = spectr.generate(engine, "w3 w5 w7", method="spectr", k=3, L=3, temperature=0, max_new_tokens=16)
    assert spec.tokens == plain.tokens


def test_a_draft_for_another_target_is_refused(hf_target, head_folder, tmp_path):
    """Same architecture and vocabulary, other weights: the draft would read the wrong embedding rows."""
    other = tiny_model("llama-gqa", seed=1, initializer_range=0.3)
    with pytest.raises(UnsupportedModelError, match="trained for another target: weights_sha256"):
        load_trained_draft(head_folder[0], other, precision="fp32")
    smaller = tiny_model("llama-gqa", seed=0, initializer_range=0.3, num_hidden_layers=1)
    with pytest.raises(UnsupportedModelError, match="num_layers 2 \\(this target: 1\\)"):
        load_trained_draft(head_folder[0], smaller, precision="fp32")
    unbound = tmp_path / "unbound"
    unbound.mkdir()
    for name in ("draft.safetensors", "draft.json"):
        (unbound / name).write_bytes((head_folder[0] / name).read_bytes())
    manifest = json.loads((unbound / "draft.json").read_text())
    del manifest["target"]
    (unbound / "draft.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedModelError, match="does not record which target"):
        load_trained_draft(unbound, hf_target, precision="fp32")
    assert load_trained_draft(head_folder[0], hf_target, precision="fp32") is not None


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory):
    """A one-layer target and a head that reproduces it (sharpened): most drafts are right."""
    from tests.decoder_law import law_target, sharpened_head

    hf = law_target()
    folder = sharpened_head(hf, tmp_path_factory.mktemp("agreeing-head"))
    return native_forward(hf, "fp32"), load_trained_draft(folder, hf, precision="fp32")


@pytest.mark.parametrize("k,length", [(1, 4), (3, 3)])
def test_greedy_with_a_head_that_agrees_accepts_and_equals_plain_greedy(agreeing, k, length):
    target, head = agreeing
    greedy = SamplingParams(temperature=0)
    plain, _ = _run(target, None, DecodeSettings(method="ar"), greedy, tokens=40)
    spec, steps = _run(target, EagleDrafter(head), DecodeSettings(method="sd" if k == 1 else "spectr", k=k,
                                                                  length=length), greedy, tokens=40)
    assert spec == plain
    kept = sum(step.accepted for step in steps[:-1]) / (length * len(steps[:-1]))
    assert kept > 0.5, f"the head kept {kept:.2f} of its drafted tokens"


def test_seeded_sampling_with_the_head_repeats(agreeing):
    target, head = agreeing
    settings, params = DecodeSettings(k=3, length=3), SamplingParams(temperature=1.0)
    first, _ = _run(target, EagleDrafter(head), settings, params, tokens=30, seed=4)
    assert _run(target, EagleDrafter(head), settings, params, tokens=30, seed=4)[0] == first
    assert _run(target, EagleDrafter(head), settings, params, tokens=30, seed=5)[0] != first


def test_the_drafts_take_the_prompt_in_while_the_decoder_processes_it(hf_target, head_folder):
    """The prompt's pass through a draft belongs to prompt processing (Decoder.prefill_seconds): by the first
    proposal the head (and a draft model) has every prompt entry but the root's, and runs the root alone."""
    target = native_forward(hf_target, "fp32")
    head = EagleDrafter(load_trained_draft(head_folder[0], hf_target, precision="fp32"))
    model = ModelDrafter(native_forward(tiny_model("llama-gqa", seed=1), "fp32"))
    prompt = [3 + i % 80 for i in range(40)]
    for drafter in (head, model):
        seen = []
        forward = drafter.lm.forward
        drafter.lm.forward = lambda tokens, *args, **kwargs: seen.append(tokens.shape[1]) or forward(tokens, *args, **kwargs)
        decoder = Decoder(target, drafter, DecodeSettings(method="sd", length=2), SamplingParams(temperature=1.0))
        stream = decoder.stream(prompt, 4, torch.Generator().manual_seed(0))
        next(stream)
        # prefill: the prompt but its last two tokens' entries (head) or its last token (model); then the root
        assert seen[:2] == ([len(prompt) - 2, 1] if drafter is head else [len(prompt) - 1, 1]), seen
        assert decoder.prefill_seconds > 0
