"""spectr's forward on the real default target, against transformers' forward."""

import copy

import pytest
import torch

from spectr.models import native_forward, resolve_source

pytestmark = pytest.mark.real_model


def test_default_source_is_the_shipped_gguf():
    source = resolve_source(None)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (source.folder / source.gguf_file).is_file()


def test_fp32_logits_equal_transformers(real_model):
    hf, tokenizer = real_model
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    assert hf.config.num_hidden_layers == 30 and hf.config.vocab_size == 49152
    with torch.no_grad():
        expected = hf(ids).logits
    lm = native_forward(hf, "fp32")
    assert lm.config.context_length == 8192
    cache = lm.new_cache(ids.shape[1] + 8)
    split = ids.shape[1] - 5
    prefill = lm.forward(ids[:, :split], torch.arange(split), cache).logits
    rest = lm.forward(ids[:, split:], torch.arange(split, ids.shape[1]), cache).logits
    ours = torch.cat([prefill, rest], 1)
    # Two float32 forwards that sum in different orders each sit ~1e-4 from the exact logits (magnitude
    # ~25) after 30 layers, so they are compared with a float64 forward: spectr's fp32 is to be about as
    # accurate as transformers' fp32 (a wrong mask, rotation or cache entry is off by far more).
    with torch.no_grad():
        exact = copy.deepcopy(hf).double()(ids).logits
    ours_error, reference_error = (ours.double() - exact).abs(), (expected.double() - exact).abs()
    assert ours_error.max() <= 1.5 * reference_error.max() and ours_error.mean() <= 1.5 * reference_error.mean()
