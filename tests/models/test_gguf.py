"""GGUF tensors as stored: block decoding, the Q/K row order, the index cache, and the native mode on the real file."""

import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from spectr.bench.forward import SAMPLE_TEXT, deviation_from
from spectr.models import gguf as gguf_module
from spectr.models.gguf import GGUFModel, StoredTensor, transformers_name, unpermute_rows
from spectr.models.loading import gguf_forward, load_model, resolve_source
from spectr.models import kernels
from spectr.models.quantize import BlockLinear, BlockQuantized, Int4Linear


class _Blocks(GGUFModel):
    """A GGUFModel over one in-memory tensor (no file): what `stored` makes of raw blocks."""

    def __init__(self, kind: str, raw: np.ndarray, shape: tuple[int, int]):
        self.architecture, self.config_dict = "qwen2", {}
        self.tensors = {"w": StoredTensor("w", kind, shape, 0, raw.nbytes)}
        self._file = raw.reshape(-1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_stored_blocks_dequantize_as_gguf_does(kind):
    values = np.random.default_rng(0).normal(size=(48, 96)).astype(np.float32)
    raw = quantize(values, GGMLQuantizationType[kind])
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]))
    stored = _Blocks(kind, raw, (48, 96)).stored("w")
    assert isinstance(stored, BlockQuantized) and stored.bits == (8 if kind == "Q8_0" else 4)
    if stored.bits == 4:
        assert int(stored.codes.min()) >= 0 and int(stored.codes.max()) <= 15
    # d·q + m in float32, as gguf computes it; Q4_0's d·q − 8d and Q8_0's d·q are exact (f16 d, small q).
    assert torch.equal(stored.dequantize(), expected)


@pytest.mark.parametrize("activation_bits", [8, 16])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_block_kernel_is_exact_at_the_extreme_codes(kind, activation_bits):
    """Codes at the ends of their range (Q8_0: −128, which no quantizer writes but a file may hold, and
    127; Q4: 0 and 15) against activations at the ends of theirs (q = ±top, and for int16 the values
    whose low byte is −128, which the AVX2 path must not negate): the kernel still computes kernel_law."""
    if not kernels.available():
        pytest.skip("spectr's kernels are not built on this machine")
    rng = np.random.default_rng(2)
    raw = quantize(rng.normal(size=(24, 160)).astype(np.float32), GGMLQuantizationType[kind]).copy()
    blocks = raw.reshape(24, 5, -1)
    if kind == "Q8_0":  # 2 bytes of scale, then 32 int8 codes
        blocks[:, :, 2:18] = np.where(rng.random((24, 5, 16)) < 0.5, 0x80, 0x7F)
    else:  # 2 + 2 bytes of scale and offset, then 16 bytes of two nibbles
        blocks[:, :, 4:12] = np.where(rng.random((24, 5, 8)) < 0.5, 0x00, 0xFF)
    stored = _Blocks(kind, raw, (24, 160)).stored("w")
    if kind == "Q8_0":
        assert int(stored.codes.min()) == -128 and int(stored.codes.max()) == 127
    # Whole-number inputs on the int16 grid (the block's largest is 32512: the scale is 1): 128 splits as
    # 256 x 1 − 128, −128 as 256 x 0 − 128.
    grid = torch.from_numpy(rng.choice([32512, -32512, 128, -128, 384, -384, 255, -255, 0, 1], size=(7, 160)))
    grid.view(7, 5, 32)[:, :, 0] = 32512
    x = grid.float() * 0.001
    bias = torch.randn(24)
    out = BlockLinear(stored, bias, activation_bits)(x)
    law = kernel_law(x, stored, bias, activation_bits)
    assert (out.double() - law).abs().max() <= 1e-6 * law.abs().max()

def test_q8_0_split_into_int4_halves_is_exact_over_every_code():
    codes = torch.arange(-128, 128, dtype=torch.int8).view(8, 32)
    # Q8_0 stores d in f16: its 11-bit mantissa times an 8-bit code is exact in float32, as are the halves.
    d = torch.tensor([0.5, 1e-3, 3.0, 0.0078125, 2.0, 1.5, 0.25, 7.0]).half().float()[:, None]
    terms = BlockQuantized.from_q8_0(codes, d).int4_terms()
    assert len(terms) == 2 and all(int(c.min()) >= 0 and int(c.max()) <= 15 for c, _, _ in terms)
    halves = [(c.float() - 8) * s + z for c, s, z in terms]
    assert torch.equal(halves[0] + halves[1], codes.float() * d)


def kernel_law(x: torch.Tensor, weight: BlockQuantized, bias: torch.Tensor, activation_bits: int) -> torch.Tensor:
    """What spectr's block kernel computes, in float64: each 32-block of a row quantized to
    q = round(x / s), s = max|x| / top (top 127 for int8, 127 x 256 for int16; float32 arithmetic,
    ties to even), its integer dot with the centred codes scaled by s and the block scale, plus the
    block's offset (+ centre x scale) times the block's float sum of x."""
    top = 127.0 if activation_bits == 8 else 127.0 * 256
    blocks = x.float().view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / top
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    x_hat = ((blocks * inverse).clamp(-top, top).round().double() * scale.double()).view_as(x)
    centre = 8 if weight.bits == 4 else 0
    codes = weight.codes.double().view(weight.shape[0], -1, 32) - centre
    slope = (codes * weight.scales.double()[..., None]).view(weight.shape)
    level = (weight.offsets.double() + centre * weight.scales.double()).repeat_interleave(32, 1)
    return x_hat @ slope.T + x.double() @ level.T + bias.double()


@pytest.mark.parametrize("activation_bits", [8, 16])
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_kernel_runs_the_stored_weight(kind, activation_bits):
    """spectr's kernel on the blocks as stored computes kernel_law over gguf's own blocks, up to float32
    rounding; int16 activations are within ~1e-5 of float64 over gguf's dequantization."""
    if not kernels.available():
        pytest.skip("spectr's kernels are not built on this machine")
    values = np.random.default_rng(1).normal(size=(80, 160)).astype(np.float32)
    raw = quantize(values, GGMLQuantizationType[kind])
    weight = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind])).double()
    bias = torch.randn(80)
    x = torch.randn(9, 160) * torch.logspace(-3, 2, 160)  # blocks of very different scales
    stored = _Blocks(kind, raw, (80, 160)).stored("w")
    assert torch.equal(stored.dequantize().double(), weight)
    out = BlockLinear(stored, bias, activation_bits)(x)
    expected = x.double() @ weight.T + bias.double()
    law = kernel_law(x, stored, bias, activation_bits)
    size = expected.abs().max()
    assert out.dtype == torch.float32 and (out.double() - law).abs().max() < 1e-6 * size
    error = (out.double() - expected).abs().max() / size
    if activation_bits == 16:
        assert error < 1e-4, error
        # Planted contrast: bf16 activations (torch's int4 path) are ~100× coarser.
        assert (x.bfloat16().double() @ weight.T + bias.double() - expected).abs().max() / size > 10 * error
    else:  # int8: the quantization moves the result, within half a step of each input, far beyond rounding
        step = x.abs().view(9, -1, 32).amax(-1).double().repeat_interleave(32, 1) / 127
        centred = stored.codes.double().view(80, -1, 32) - (8 if stored.bits == 4 else 0)
        slope = (centred * stored.scales.double()[..., None]).view(80, 160)  # what multiplies the quantized x
        bound = (step / 2) @ slope.abs().T
        assert ((out.double() - expected).abs() <= bound + 1e-6 * size).all()
        assert error > 1e-4, error


def test_int4_fallback_runs_the_stored_weight():
    values = np.random.default_rng(1).normal(size=(64, 128)).astype(np.float32)
    for kind in ("Q4_1", "Q8_0"):
        stored = _Blocks(kind, quantize(values, GGMLQuantizationType[kind]), (64, 128)).stored("w")
        x = torch.randn(5, 128).to(torch.bfloat16)
        # What torch's kernel should compute: its bf16 scales and zeros, fp32 sums.
        rounded = sum((c.float() - 8) * s.bfloat16().float()[:, :, None].expand(-1, -1, 32).reshape(c.shape)
                      + z.bfloat16().float()[:, :, None].expand(-1, -1, 32).reshape(c.shape)
                      for c, s, z in stored.int4_terms())
        expected = x.float() @ rounded.T
        out = Int4Linear(stored, None)(x).float()
        torch.testing.assert_close(out, expected, rtol=2 ** -7, atol=2e-2)


def test_unpermute_inverts_the_llama_cpp_converter():
    heads, rows = 3, 3 * 8
    weight = torch.randn(rows, 5)
    # convert_hf_to_gguf.py: w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)
    permuted = weight.reshape(heads, 2, rows // heads // 2, 5).swapaxes(1, 2).reshape(rows, 5)
    assert torch.equal(permuted[unpermute_rows(rows, heads)], weight)


def test_gguf_names_map_to_transformers_names():
    assert transformers_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert transformers_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert transformers_name("token_embd.weight") == "model.embed_tokens.weight"
    assert transformers_name("output_norm.weight") == "model.norm.weight"
    assert transformers_name("rope_freqs.weight") is None


# -- the real file ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_gguf():
    source = resolve_source(None)
    return GGUFModel(source.folder / source.gguf_file)


@pytest.mark.real_model
def test_the_default_file_is_read_as_stored(default_gguf):
    kinds = [t.kind for t in default_gguf.tensors.values()]
    assert kinds.count("Q4_1") == 210 and kinds.count("Q8_0") == 1 and kinds.count("F32") == 61
    state = default_gguf.state(as_stored=True)
    embedding = state["model.embed_tokens.weight"]
    assert isinstance(embedding, BlockQuantized) and embedding.bits == 8  # Q8_0 kept at 8 bits
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        assert torch.equal(state[name].dequantize(), default_gguf.dense(name)) or torch.allclose(
            state[name].dequantize(), default_gguf.dense(name), rtol=0, atol=1e-6)


@pytest.mark.real_model
def test_dequantized_gguf_forward_equals_transformers(real_model, default_gguf):
    """spectr's own reading of the file (names, Q/K order, config, RoPE) against transformers' reading."""
    hf, tokenizer = real_model
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        expected = hf(ids).logits[0]
    lm = gguf_forward(default_gguf, "fp32")
    logits = lm.forward(ids, torch.arange(64), lm.new_cache(64)).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.real_model
def test_native_modes_lose_little_beyond_the_file(default_gguf):
    """Mean next-token TV against fp32 over the file's dequantized weights: native (int8 activations,
    llama.cpp's scheme) ≤ 0.02 (bf16 dense: ~0.011, measured 0.017), native-int16 ≤ 0.001 (measured 1e-4)."""
    tokenizer = default_gguf.tokenizer()
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids[:, :200]
    logits = {}
    for precision in ("fp32", "native", "native-int16", "int4"):
        lm = gguf_forward(default_gguf, precision)
        logits[precision] = lm.forward(ids, torch.arange(200), lm.new_cache(200)).logits[0]
    native, wide, requantized = (deviation_from(logits["fp32"], logits[p])["mean_tv"]
                                 for p in ("native", "native-int16", "int4"))
    assert native <= 0.02, native
    assert wide <= 0.001, wide
    assert requantized > 2 * native  # the planted contrast: re-quantizing what is stored costs accuracy


@pytest.mark.real_model
def test_tokenizer_and_template_equal_transformers(real_model, default_gguf):
    _, expected = real_model
    tokenizer = default_gguf.tokenizer()
    assert tokenizer.get_vocab() == expected.get_vocab()
    assert tokenizer.chat_template == expected.chat_template
    messages = [{"role": "user", "content": "Name three rivers. <|im_end|> ünïcödé"}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            == expected.apply_chat_template(messages, add_generation_prompt=True))
    assert tokenizer.eos_token_id == expected.eos_token_id


@pytest.mark.real_model
def test_native_load_builds_no_transformers_model_and_prints_nothing(capfd):
    load_model(None)  # the index exists after this, as it would on any later run
    capfd.readouterr()
    loaded = load_model(None)
    assert loaded.lm.precision == "native" and loaded.transformers_model is None
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.real_model
def test_the_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch, default_gguf):
    monkeypatch.setenv("SPECTR_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "model.gguf"
    copy.write_bytes(default_gguf.path.read_bytes())
    first = GGUFModel(copy)
    built = []
    original = GGUFModel._build_index
    monkeypatch.setattr(GGUFModel, "_build_index", lambda self, *a: built.append(1) or original(self, *a))
    second = GGUFModel(copy)
    assert built == [] and second.tensors == first.tensors and second.config_dict == first.config_dict
    stat = copy.stat()  # another mtime: the index no longer describes this file
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    GGUFModel(copy)
    assert built == [1]
    assert gguf_module.cache_root() == tmp_path / "cache"
