"""`spectr train-draft` end to end on a tiny target: trains, checkpoints, resumes, exports, decodes exactly."""

import json

import pytest
import torch

import spectr
from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters import ModelDrafter
from spectr.drafters.trained import load_trained_draft
from spectr.errors import ModelNotFoundError
from spectr.models import load_model
from spectr.processing import SamplingParams
from spectr.training.distill import DistillConfig, train
from tests.models.test_loading import save_tiny_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("target"))
    output = tmp_path_factory.mktemp("draft")
    config = DistillConfig(target=str(folder), layers=1, vocab=32, sequence=16, batch=2, steps=3,
                           checkpoint_every=2, eval_tokens=64, train_tokens_limit=3000, teacher_precision="fp32")
    final = train(config, output, resume=False, log=lambda message: None)
    return folder, output, config, final


def test_training_runs_checkpoints_and_resumes(trained):
    folder, output, config, final = trained
    assert final["step"] == 3
    manifest = json.loads((output / "draft.json").read_text())
    assert manifest["layers"] == 1 and manifest["recipe"]["seed"] == 0
    assert [entry["step"] for entry in manifest["history"]] == [0, 2, 3]
    more = DistillConfig(**{**config.__dict__, "steps": 4})
    resumed = train(more, output, resume=True, log=lambda message: None)
    assert resumed["step"] == 4


def test_trained_draft_decodes_exactly(trained):
    folder, output, _, _ = trained
    target = load_model(folder, precision="fp32")
    draft = load_trained_draft(output, target.hf_model, precision="fp32")
    greedy = SamplingParams(temperature=0)
    prompt = [3, 5, 7, 9]

    def run(settings, drafter):
        decoder = Decoder(target.lm, drafter, settings, greedy)
        return [t for step in decoder.stream(prompt, 16, torch.Generator().manual_seed(0)) for t in step.emitted]

    assert run(DecodeSettings(k=3, length=3), ModelDrafter(draft)) == run(DecodeSettings(method="ar"), None)
    logits = draft.forward(torch.tensor([prompt]), torch.arange(4), draft.new_cache(8)).logits
    assert torch.isinf(logits).any(-1).all()  # a reduced head: q is zero outside the kept tokens
    engine = spectr.load(folder, draft=output, precision="fp32")
    assert "draft" in engine.describe() and engine.draft.lm.vocab_subset.numel() == 32


def test_missing_draft_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a trained draft"):
        load_trained_draft(tmp_path, None)


def test_a_trained_draft_that_agrees_is_accepted_and_exact(tmp_path):
    """A draft started from all of the target's layers over its whole vocabulary, barely trained: it
    agrees with the target, so greedy decoding really runs through accepted paths of the draft format."""
    folder = save_tiny_model(tmp_path / "target")
    config = DistillConfig(target=str(folder), layers=2, vocab=96, sequence=16, batch=2, steps=1,
                           learning_rate=1e-7, checkpoint_every=1, eval_tokens=64, train_tokens_limit=1000,
                           teacher_precision="fp32")
    train(config, tmp_path / "draft", resume=False, log=lambda message: None)
    target = load_model(folder, precision="fp32")
    draft = load_trained_draft(tmp_path / "draft", target.hf_model, precision="fp32")
    greedy = SamplingParams(temperature=0)
    prompt = [3, 5, 7, 9]
    plain = [t for step in Decoder(target.lm, None, DecodeSettings(method="ar"), greedy).stream(
        prompt, 16, torch.Generator()) for t in step.emitted]
    steps = list(Decoder(target.lm, ModelDrafter(draft), DecodeSettings(k=2, length=3), greedy).stream(
        prompt, 16, torch.Generator()))
    assert [t for step in steps for t in step.emitted] == plain
    assert all(step.accepted == 3 for step in steps[:-1])
