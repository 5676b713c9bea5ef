"""Training the EAGLE-style head: it learns, resumes exactly, chooses its vocabulary by measured mass,
and a fused-feature (EAGLE-3-style) head drafts exactly what training computed."""

import json

import pytest
import torch

import spectr
from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import EagleDrafter
from spectr.drafters.trained import load_trained_draft, target_identity
from spectr.errors import UnsupportedModelError
from spectr.models import load_model
from spectr.models.llama import rotary_tables
from spectr.processing import SamplingParams
from spectr.training.eagle import (EagleConfig, EagleHead, choose_vocabulary, export, head_losses,
                                   make_batch, train)
from spectr.training.samples import DataRecipe, default_feature_layers, generate_dataset, load_sequences
from tests.models.test_loading import save_tiny_model
from tests.models.tiny import VOCAB
from tests.test_draft_data import TINY_TEMPLATE

PROMPT = [3, 17, 42, 8, 25, 3, 17]


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny target with a peaked law (large weights) and its own samples, both splits."""
    folder = save_tiny_model(tmp_path_factory.mktemp("target"), chat=TINY_TEMPLATE, initializer_range=0.3)
    model = load_model(folder, precision="fp32")
    samples = tmp_path_factory.mktemp("samples")
    recipe = DataRecipe(tokens=6000, rows=16, chunk_steps=64, mix=(("instruction", 0.6), ("text", 0.4)),
                        max_answer_tokens=24, text_tokens=6, max_text_tokens=24, min_kept_tokens=4, precision="fp32")
    generate_dataset(model.lm, model.tokenizer, samples, recipe, frozenset([1]), max_chunks=3, log=lambda m: None)
    train_set, held_out = load_sequences(samples, held_out=False), load_sequences(samples, held_out=True)
    if len(held_out) < 4:  # too few held-out prompts in so small a run: hold out the last training ones
        train_set, held_out = train_set[:-8], train_set[-8:]
    return folder, model, train_set, held_out


def _config(**overrides) -> EagleConfig:
    settings = dict(vocab=64, unroll=3, sequence=32, batch_tokens=256, steps=40, learning_rate=3e-3, warmup=4,
                    checkpoint_every=20, eval_sequences=8)
    return EagleConfig(**{**settings, **overrides})


def _layers(model):
    return default_feature_layers(model.lm.config.num_layers)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "final-features"])
def test_the_head_learns_the_target(peaked, tmp_path, fused):
    """Loss falls and held-out acceptance rises at every depth, training on the target's own samples."""
    _, model, train_set, held_out = peaked
    final = train(_config(fused=fused), model, train_set, held_out, tmp_path, resume=False, log=lambda m: None,
                  feature_layers=_layers(model))
    history = json.loads((tmp_path / "draft.json").read_text())["history"]
    first, last = history[0]["acceptance"]["T=1"], final["acceptance"]["T=1"]
    assert all(after > before + 0.05 for before, after in zip(first, last)), (first, last)
    # Every step's training loss is on a different batch, so compare the first and last five steps
    # (the manifest keeps only evaluated steps; the checkpoint keeps them all).
    steps = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["history"]
    losses = [h["loss"] for h in steps if h["loss"] is not None]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert final["acceptance"]["greedy"][0] > history[0]["acceptance"]["greedy"][0]


def test_a_resumed_run_reaches_the_same_state(peaked, tmp_path):
    _, model, train_set, held_out = peaked
    config = _config(steps=6, checkpoint_every=3)
    run = lambda folder, **kw: train(config, model, train_set, held_out, folder, log=lambda m: None,  # noqa: E731
                                     feature_layers=_layers(model), **kw)
    whole = run(tmp_path / "whole", resume=False)
    run(tmp_path / "parts", resume=False, stop_at=3)
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)["step"] == 3
    parts = run(tmp_path / "parts", resume=True)
    assert parts["loss"] == whole["loss"] and parts["acceptance"] == whole["acceptance"]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)
    for name, tensor in a["head"].items():
        assert torch.equal(tensor, b["head"][name]), name
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_the_vocabulary_is_chosen_by_the_targets_mass(peaked):
    _, model, train_set, _ = peaked
    head_rows = model.weight("model.embed_tokens.weight")
    kept, measured = choose_vocabulary(train_set, head_rows, EagleConfig(vocab=None, coverage=0.5))
    assert measured["mass"] >= 0.5 and kept.numel() == measured["rows"]
    assert torch.equal(kept, kept.sort().values)
    fixed, small = choose_vocabulary(train_set, head_rows, EagleConfig(vocab=8))
    assert fixed.numel() == 8 and small["mass"] <= measured["mass"]
    # The kept rows are the heaviest: any other 8 rows hold no more of the target's mass.
    assert small["mass"] >= measured["mass_by_rows"].get("8", 0)


@pytest.mark.parametrize("loss", ["kl", "kl+tv"])
def test_the_training_loss_is_the_kl_written_out(peaked, loss):
    """head_losses (the teacher's p from its stored features and lse) against −Σ p log q
    written out in float64 over every kept token, depth by depth and in its gradient. The kept rows hold
    well under all of p, so a loss that renormalized p on them (as if it summed to 1) would fail."""
    _, model, train_set, _ = peaked
    config = _config(vocab=16, loss=loss)
    torch.manual_seed(5)
    layers = _layers(model)
    head = EagleHead(model.hf_config, rotary_tables(model.hf_config, 256), fused_layers=len(layers))
    embedding = model.weight("model.embed_tokens.weight")
    kept_rows = embedding[torch.arange(0, 32, 2)]
    batch = make_batch(train_set[:6], config.sequence, fused=True)
    total, per_depth = head_losses(head, batch, embedding, kept_rows, config)
    (gradient,) = torch.autograd.grad(total, [head.fc.weight])

    outputs = head.unrolled(batch.features, embedding[batch.tokens], batch.positions, batch.valid, config.unroll)
    lse = batch.target_lse.where(batch.loss_mask, torch.inf)
    p = (batch.target_features.double() @ kept_rows.double().T - lse.double()[..., None]).exp()
    assert float(p.sum(-1)[batch.loss_mask].max()) < 0.9
    index = torch.arange(batch.tokens.shape[1])
    expected = []
    for depth, out in enumerate(outputs, start=1):
        log_q = (out.double() @ kept_rows.double().T).log_softmax(-1)
        entry = -(p * log_q).sum(-1)
        if loss == "kl+tv":
            entry = entry + 1 - torch.minimum(p, log_q.exp()).sum(-1)
        mask = batch.loss_mask & (index >= depth - 1)[None]
        expected.append(entry[mask].mean())
    reference = sum(config.depth_weight ** r * value for r, value in enumerate(expected))
    (reference_gradient,) = torch.autograd.grad(reference, [head.fc.weight])
    assert per_depth == pytest.approx([float(v) for v in expected], rel=1e-5)
    torch.testing.assert_close(gradient, reference_gradient, rtol=1e-4, atol=1e-6)


def _fused_head(model, folder, scale=3.0):
    torch.manual_seed(4)
    layers = _layers(model)
    head = EagleHead(model.hf_config, rotary_tables(model.hf_config, 256), fused_layers=len(layers))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_((parameter * scale).to(torch.bfloat16).float())
    kept = torch.arange(0, VOCAB, 2)
    export(head, kept, EagleConfig(), [], folder, target_identity(model), feature_layers=layers)
    return head, kept


def test_fused_drafting_matches_the_training_unroll(peaked, tmp_path):
    """Depth r of the unrolled fused head = the r-th draft token's distribution while drafting, with the
    drafter fusing the target's captured layers itself."""
    _, model, _, _ = peaked
    head, kept = _fused_head(model, tmp_path)
    draft = load_trained_draft(tmp_path, model, precision="fp32")
    assert draft.feature_layers == _layers(model)
    text = PROMPT
    out = model.lm.forward(torch.tensor([text]), torch.arange(len(text)), model.lm.new_cache(32),
                           capture=draft.feature_layers)
    drafter = EagleDrafter(draft)
    drafter.reset(64)
    drafter.observe(out.layers[0, :-1])
    tree = drafter.propose(text, 1, 3, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    chain = text + tree.tokens[:2].tolist()
    entries = len(chain) - 1
    inputs = torch.zeros(1, entries, *out.layers.shape[2:])
    inputs[0, : len(text) - 1] = out.layers[0, :-1]
    with torch.no_grad():
        outputs = head.unrolled(inputs, model.lm.embed(torch.tensor(chain[1:]))[None],
                                torch.arange(1, entries + 1)[None], torch.ones(1, entries, dtype=torch.bool), 3)
    rows = model.weight("model.embed_tokens.weight")[kept]
    for depth in range(3):
        q = (outputs[depth][0, len(text) - 2 + depth] @ rows.T).softmax(-1)
        torch.testing.assert_close(tree.draft_probs[depth][kept], q, atol=1e-4, rtol=0)


@pytest.mark.parametrize("k,length", [(1, 3), (3, 2)])
def test_a_fused_head_decodes_greedy_text_exactly(peaked, tmp_path, k, length):
    _, model, _, _ = peaked
    _fused_head(model, tmp_path)
    draft = load_trained_draft(tmp_path, model, precision="fp32")
    greedy = SamplingParams(temperature=0)

    def run(settings, drafter):
        decoder = Decoder(model.lm, drafter, settings, greedy)
        return [t for s in decoder.stream(PROMPT, 24, torch.Generator().manual_seed(0)) for t in s.emitted]

    assert run(DecodeSettings(method="sd" if k == 1 else "spectr", k=k, length=length), EagleDrafter(draft)) == run(
        DecodeSettings(method="ar"), None)


def test_a_fused_head_needs_a_target_that_hands_over_layers(peaked, tmp_path):
    _, model, _, _ = peaked
    _fused_head(model, tmp_path)
    draft = load_trained_draft(tmp_path, model, precision="fp32")
    from spectr.models import TransformersForward

    reference = TransformersForward(model.hf_model, "fp32")
    with pytest.raises(UnsupportedModelError, match="reads the target's layers"):
        Decoder(reference, EagleDrafter(draft), DecodeSettings(k=2, length=2), SamplingParams())


def test_a_draft_for_another_tokenizer_is_refused(peaked, tmp_path):
    """Same weights, other token strings: the draft would propose the wrong text."""
    folder, model, _, _ = peaked
    _fused_head(model, tmp_path / "head")
    other = load_model(save_tiny_model(tmp_path / "other", chat=TINY_TEMPLATE, vocab_shift=1, initializer_range=0.3),
                       precision="fp32")
    assert target_identity(other)["weights_sha256"] == target_identity(model)["weights_sha256"]
    with pytest.raises(UnsupportedModelError, match="trained for another target: tokenizer_sha256"):
        load_trained_draft(tmp_path / "head", other, precision="fp32")
    with pytest.raises(UnsupportedModelError, match="trained for another target"):
        spectr.load(tmp_path / "other", draft=tmp_path / "head", precision="fp32")


def test_the_drafts_study_renders_every_measure(peaked, tmp_path):
    """The study's report and plots from measured reports (the measuring itself runs on the real model)."""
    from spectr.studies import drafts

    _, model, _, held_out = peaked
    _fused_head(model, tmp_path / "head")
    per_depth = drafts.depth_acceptance(tmp_path / "head", model, held_out[:4], depths=2)
    assert set(per_depth) == set(drafts.TEMPERATURES) and all(len(v) == 2 for v in per_depth.values())
    table = {(k, length): 1.0 + k / 10 for k in drafts.KS for length in drafts.LENGTHS}
    manifest = json.loads((tmp_path / "head" / "draft.json").read_text())
    reports = [drafts.DraftReport("new", per_depth, {label: 0.5 for label in drafts.TEMPERATURES}, {1.0: table},
                                  0.08, manifest),
               drafts.DraftReport("n-gram lookup", block_efficiency={1.0: table})]
    setup = {"held_out_sequences": 4, "depths": 2, "prompts": 2, "tokens": 8, "temperatures": (1.0,),
             "held_out_tokens": 40, "answer_tokens": 30}
    text = drafts.render(reports, setup, "spectr study drafts")
    assert "| new | " in text and "T=0.7 d2" in text and "k=4 L=4" in text and "0.080" in text
    drafts.plot(reports, setup, tmp_path / "depths.png")
    assert (tmp_path / "depths.png").stat().st_size > 0
