"""`spectr check`: the batch-invariance probe measures (it can fail), and the kernel fallback runs."""

import pytest
import torch
from typer.testing import CliRunner

from spectr import checks
from spectr.cli import app
from spectr.models import kernels, native_forward
from tests.models.tiny import tiny_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="spectr's kernels are not built here")
PROMPT = [5, 17, 3, 42, 8, 11]


class _TreesDrift:
    """A forward whose multi-token passes are off by one ulp-sized nudge: not invariant."""

    def __init__(self, lm):
        self.lm, self.config = lm, lm.config

    def new_cache(self, *args, **kwargs):
        return self.lm.new_cache(*args, **kwargs)

    def forward(self, tokens, *args, **kwargs):
        out = self.lm.forward(tokens, *args, **kwargs)
        if tokens.shape[1] > 1:
            return type(out)(logits=out.logits + 1e-6, hidden=out.hidden)
        return out


@needs_kernels
def test_the_probe_finds_spectrs_kernels_bitwise_invariant_and_a_drifting_forward_not():
    lm = native_forward(tiny_model("llama-gqa"), "int4")
    assert lm.fused  # whole layers on the kernel, as the default GGUF runs
    assert checks.tree_invariance(lm, PROMPT) == 0.0
    assert checks.tree_invariance(_TreesDrift(lm), PROMPT) > 0.0  # the negative control


def test_without_spectrs_kernels_the_block_precisions_fall_back_to_torch(monkeypatch):
    hf = tiny_model("llama-gqa")
    reference = native_forward(hf, "fp32")
    tokens = torch.tensor([PROMPT])
    expected = reference.forward(tokens, torch.arange(len(PROMPT)), reference.new_cache(16)).logits
    monkeypatch.setattr(kernels, "library", lambda: None)  # as where no compiler exists
    assert not kernels.available()
    lm = native_forward(hf, "int4")
    assert not lm.fused and lm.dtype == torch.bfloat16
    got = lm.forward(tokens, torch.arange(len(PROMPT)), lm.new_cache(16)).logits
    assert got.isfinite().all()
    # The int4 fallback is an approximation of fp32: close in law, not in bits.
    tv = 0.5 * (got.softmax(-1) - expected.softmax(-1)).abs().sum(-1)
    assert float(tv.max()) < 0.1
    assert checks.machine().kernels is False


def test_machine_reports_what_spectr_can_use():
    here = checks.machine()
    assert here.threads >= 1 and here.kernels == kernels.available()
    assert set(here.simd) <= set(checks.SIMD_FLAGS)


@pytest.mark.real_model
@needs_kernels
def test_spectr_check_passes_the_default_precision_on_the_default_model(real_model):
    result = CliRunner().invoke(app, ["check", "--precision", "native", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert "yes" in rows["native (default)"].split("│")[-2]
    assert "no" in rows["bf16"].split("│")[-2]  # dense bf16 GEMMs block by row count
