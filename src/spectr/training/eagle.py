"""An EAGLE-style draft head, trained on the target's own samples (`samples.py`).

The head is one Llama decoder layer whose input at position j is
    fc([norm(g_{j-1}) ; norm(embed(x_j))])
where g_{j-1} is what the target knows about the prefix after x_{j-1}: either
its final-norm hidden state h_{j-1} (EAGLE-1) or, as EAGLE-3 found better, a
learned fusion of the residual streams after a low, a middle and a high
layer,  g = fuse([norm(a) ; norm(b) ; norm(c)]). The head's output, after a
final norm, is its guess ĥ_j of the target's next final hidden state; the
target's own LM head rows (restricted to `vocab` frequent tokens, q = 0
elsewhere: still exact) turn it into the draft distribution of x_{j+1}.
While drafting, a draft feeds its own ĥ back in place of g.

Training sees the same thing ("training-time test", as EAGLE-3 does): depth 1
reads true features; depth r reads depth r−1's outputs, attending to
true-feature entries up to r−1 positions back and to its own chain of
predicted entries since, exactly the attention pattern of the r-th draft token
at inference. The label at every depth is the target's full law over the kept
tokens, p(v) = exp(W_v·h − lse) (the sample files store h and lse):
  - "kl": −Σ_{v∈S} p(v) log q(v) (KL up to a constant),
  - "tv": 1 − Σ min(p, q), the acceptance itself,
  - "kl+tv": their sum;
depth r weighted by depth_weight^(r−1). Held-out metric: per-token acceptance
Σ min(p, q) at each depth, at T = 1, 0.7 and greedy agreement.

Training resumes exactly: the order of batches is a function of the seed and
the step, and a checkpoint holds the head, the optimiser and the curve.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from spectr.drafters.trained import MANIFEST, WEIGHTS, target_identity
from spectr.training.samples import Sequence

CHECKPOINT = "checkpoint.pt"
FORMAT = "spectr-eagle-2"
LOSSES = ("kl", "tv", "kl+tv")


@dataclass
class EagleConfig:
    vocab: int | None = None  # head rows kept (the most frequent sampled tokens); None: by `coverage`
    coverage: float = 0.95  # with vocab None: the fewest rows keeping this share of the target's mass
    fused: bool = True  # read a low, a middle and a high layer (EAGLE-3) rather than the final hidden state
    unroll: int = 4  # draft depths trained together (training-time test; EAGLE-3 uses 7, the trees here are ≤ 4 deep)
    depth_weight: float = 0.8  # loss weight of depth r is depth_weight ** (r - 1)
    loss: str = "kl"  # one of LOSSES
    sequence: int = 320  # longest training sequence (longer ones are cut)
    batch_tokens: int = 4096
    steps: int = 2000
    learning_rate: float = 1e-3
    warmup: int = 50
    seed: int = 0
    checkpoint_every: int = 100
    init_from_layer: int | None = None  # a target layer to start the head's layer from (None: random, as EAGLE)
    eval_sequences: int = 64
    temperatures: tuple[float, ...] = field(default=(1.0, 0.7, 0.0))
    bf16: bool | None = None  # autocast the head to bf16; None: where the CPU has bf16 arithmetic (or on a GPU)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class EagleHead(nn.Module):
    """The trainable head: (fusion,) fc, one decoder layer, final norm (names as in a Llama state dict).

    fused_layers: how many target layers the feature fuses (0: the final hidden state is the feature)."""

    def __init__(self, target_config, rotary: tuple[Tensor, Tensor], fused_layers: int = 0):
        super().__init__()
        c = target_config
        d, e = c.hidden_size, c.hidden_size // c.num_attention_heads
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, e
        self.eps = c.rms_norm_eps
        self.fused_layers = fused_layers
        if fused_layers:
            # Each layer's residual stream has its own scale (it grows with depth): normalise each first.
            self.layer_norms = nn.Parameter(torch.ones(fused_layers, d))
            self.fuse = nn.Linear(fused_layers * d, d, bias=False)
        # Both inputs are RMS-normalised first: the target's features are ~15x larger than its token
        # embeddings, which would leave the newest token (the most telling input) nearly unheard.
        self.feature_norm = nn.Parameter(torch.ones(d))
        self.embedding_norm = nn.Parameter(torch.ones(d))
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.input_layernorm = nn.Parameter(torch.ones(d))
        self.q_proj = nn.Linear(d, self.heads * e, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * e, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * e, bias=False)
        self.o_proj = nn.Linear(self.heads * e, d, bias=False)
        self.post_attention_layernorm = nn.Parameter(torch.ones(d))
        self.gate_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, d, bias=False)
        self.norm = nn.Parameter(torch.ones(d))
        self.register_buffer("cos", rotary[0], persistent=False)
        self.register_buffer("sin", rotary[1], persistent=False)

    def init_from(self, target_state: dict[str, Tensor], layer: int) -> None:
        prefix = f"model.layers.{layer}."
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(self, name).weight.copy_(target_state[prefix + f"self_attn.{name}.weight"])
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(self, name).weight.copy_(target_state[prefix + f"mlp.{name}.weight"])
            self.input_layernorm.copy_(target_state[prefix + "input_layernorm.weight"])
            self.post_attention_layernorm.copy_(target_state[prefix + "post_attention_layernorm.weight"])
            self.norm.copy_(target_state["model.norm.weight"])

    def fuse_features(self, layers: Tensor) -> Tensor:
        """The feature g from the target's layers [..., n, D] -> [..., D] (as the drafter computes it)."""
        normed = _rms_norm(layers, self.layer_norms, self.eps)
        return self.fuse(normed.flatten(-2))

    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, T, E]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def unrolled(self, features: Tensor, embeddings: Tensor, positions: Tensor, valid: Tensor, steps: int):
        """Outputs of draft depths 1..steps at every entry. features [B, T, D] (or [B, T, n, D] for a
        fused head), embeddings [B, T, D], valid [B, T].

        Depth r at entry j reads depth r−1's output at j−1, and attends to depth-1 entries at
        ≤ j−r+1 and to the depth-u entry at j−r+u for u = 2..r (its own chain of drafts).
        """
        if self.fused_layers:
            features = self.fuse_features(features)
        batch, length, _ = features.shape
        index = torch.arange(length)
        keys, values, outputs = [], [], []
        inputs = features
        for step in range(1, steps + 1):
            x = self.fc(torch.cat([_rms_norm(inputs, self.feature_norm, self.eps),
                                   _rms_norm(embeddings, self.embedding_norm, self.eps)], -1))
            normed = _rms_norm(x, self.input_layernorm, self.eps)
            q = self._rotate(self.q_proj(normed).view(batch, length, self.heads, -1).transpose(1, 2), positions)
            k = self._rotate(self.k_proj(normed).view(batch, length, self.kv_heads, -1).transpose(1, 2), positions)
            v = self.v_proj(normed).view(batch, length, self.kv_heads, -1).transpose(1, 2)
            keys.append(k)
            values.append(v)
            blocks = [(index[None, :] <= index[:, None] - (step - 1))[None] & valid[:, None, :]]  # depth-1 keys
            for u in range(2, step + 1):
                blocks.append((index[None, :] == index[:, None] - (step - u))[None].expand(batch, -1, -1))
            mask = torch.cat(blocks, -1)[:, None]  # [B, 1, T, step·T]
            attended = F.scaled_dot_product_attention(
                q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + self.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
            normed = _rms_norm(x, self.post_attention_layernorm, self.eps)
            x = x + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))
            out = _rms_norm(x, self.norm, self.eps)
            outputs.append(out)
            inputs = torch.cat([out.new_zeros(batch, 1, out.shape[-1]), out[:, :-1]], 1)  # ĥ at j−1 feeds j
        return outputs

    def export_state(self) -> dict[str, Tensor]:
        """Weights under the names spectr's forward reads (layer 0 of a 1-layer model, fc, the fusion)."""
        p = "model.layers.0."
        state = {"model.fc.weight": self.fc.weight, "model.norm.weight": self.norm,
                 "model.feature_norm.weight": self.feature_norm, "model.embedding_norm.weight": self.embedding_norm,
                 p + "input_layernorm.weight": self.input_layernorm,
                 p + "post_attention_layernorm.weight": self.post_attention_layernorm}
        if self.fused_layers:
            state["model.fuse.weight"] = self.fuse.weight
            state["model.layer_norms.weight"] = self.layer_norms
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = getattr(self, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[p + f"mlp.{name}.weight"] = getattr(self, name).weight
        return {name: tensor.detach() for name, tensor in state.items()}


@dataclass
class Batch:
    features: Tensor  # [B, T, D] h_{j-1} (true), or [B, T, n, D] the target's layers there
    tokens: Tensor  # [B, T] x_j
    positions: Tensor  # [B, T] j
    valid: Tensor  # [B, T] a real entry
    target_features: Tensor  # [B, T, D] h_j: the target's feature that predicts x_{j+1}
    target_lse: Tensor  # [B, T]
    loss_mask: Tensor  # [B, T] x_{j+1} exists and was sampled by the target (not prompt text)


def make_batch(sequences: list[Sequence], max_length: int, fused: bool = False) -> Batch:
    """Entries e = 0..n-2 of each sequence: input (h_e, x_{e+1}) at position e+1, target h_{e+1}."""
    length = min(max_length, max(s.tokens.numel() - 1 for s in sequences))
    d = sequences[0].hidden.shape[-1]
    b = len(sequences)
    feature_shape = (b, length, sequences[0].layers.shape[1], d) if fused else (b, length, d)
    batch = Batch(
        features=torch.zeros(feature_shape), tokens=torch.zeros(b, length, dtype=torch.long),
        positions=torch.zeros(b, length, dtype=torch.long), valid=torch.zeros(b, length, dtype=torch.bool),
        target_features=torch.zeros(b, length, d), target_lse=torch.zeros(b, length),
        loss_mask=torch.zeros(b, length, dtype=torch.bool),
    )
    for row, s in enumerate(sequences):
        n = min(s.tokens.numel() - 1, length)  # entries
        batch.features[row, :n] = (s.layers if fused else s.hidden)[:n].float()
        batch.tokens[row, :n] = s.tokens[1 : n + 1]
        batch.positions[row, :n] = torch.arange(1, n + 1)
        batch.valid[row, :n] = True
        targets = min(n, s.hidden.shape[0] - 1)  # entry e needs h_{e+1}
        batch.target_features[row, :targets] = s.hidden[1 : targets + 1].float()
        entry = torch.arange(targets)
        sampled = entry + 2 >= s.prompt_length
        lse = s.lse[1 : targets + 1]
        batch.loss_mask[row, :targets] = sampled & ~lse.isnan()
        batch.target_lse[row, :targets] = lse.nan_to_num(0.0)  # NaN inside prompts, which carry no loss
    return batch


def batch_plan(lengths: list[int], batch_tokens: int, max_length: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches (sequence indices) as a function of (seed, epoch) only: shuffled, then sorted
    by length within windows of 64 so each batch pads little while the order stays random."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    plan = []
    for start in range(0, len(order), 64):
        window = sorted(order[start : start + 64], key=lambda i: lengths[i])
        group: list[int] = []
        for i in window:
            group.append(i)
            if min(max_length, max(lengths[j] for j in group)) * len(group) >= batch_tokens:
                plan.append(group)
                group = []
        if group:
            plan.append(group)
    return plan


def batch_at(sequences: list[Sequence], step: int, config: EagleConfig) -> Batch:
    """The batch of training step `step` (0-based): the same whether the run was resumed or not."""
    lengths = [s.tokens.numel() for s in sequences]
    epoch = 0
    while True:
        plan = batch_plan(lengths, config.batch_tokens, config.sequence, config.seed, epoch)
        if step < len(plan):
            return make_batch([sequences[i] for i in plan[step]], config.sequence, config.fused)
        step -= len(plan)
        epoch += 1


def target_mass(sequences: list[Sequence], head_rows: Tensor, limit: int = 20_000) -> Tensor:
    """The target's mean law over sampled positions of `sequences` (up to `limit` of them): [V]."""
    total, count = torch.zeros(head_rows.shape[0]), 0
    for s in sequences:
        rows = torch.arange(max(s.prompt_length - 1, 0), s.hidden.shape[0])
        rows = rows[~s.lse[rows].isnan()]
        if not rows.numel():
            continue
        logits = s.hidden[rows].float() @ head_rows.T
        total += (logits - s.lse[rows, None]).exp().sum(0)
        count += rows.numel()
        if count >= limit:
            break
    return total / max(count, 1)


def choose_vocabulary(sequences: list[Sequence], head_rows: Tensor, config: EagleConfig) -> tuple[Tensor, dict]:
    """The kept tokens (ascending ids) and the measured coverage: the target's mean probability mass on
    the kept set is the ceiling of the draft's acceptance, so rows are chosen by that mass."""
    mass = target_mass(sequences, head_rows)
    ranked = mass.argsort(descending=True)
    cumulative = mass[ranked].cumsum(0)
    if config.vocab is not None:
        count = min(config.vocab, mass.numel())
    else:
        count = int((cumulative < config.coverage).sum()) + 1
        count = min(mass.numel(), -(-count // 256) * 256)  # whole blocks of rows
    curve = {str(n): round(float(cumulative[min(n, mass.numel()) - 1]), 4)
             for n in (1024, 2048, 4096, 8192, 12288, 16384, 24576, 32768) if n <= mass.numel()}
    return ranked[:count].sort().values, {"rows": count, "mass": round(float(cumulative[count - 1]), 4),
                                          "mass_by_rows": curve}


def head_losses(head: EagleHead, batch: Batch, embedding: Tensor, kept_rows: Tensor, config: EagleConfig):
    """Per-depth losses against the target on the kept tokens, and the weighted total."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the teacher in full precision
        target_p = (batch.target_features @ kept_rows.T - batch.target_lse[..., None]).exp()  # [B, T, K]
    outputs = head.unrolled(batch.features, embedding[batch.tokens], batch.positions, batch.valid,
                            config.unroll)
    index = torch.arange(batch.tokens.shape[1])
    losses = []
    for step, out in enumerate(outputs, start=1):
        mask = batch.loss_mask & (index >= step - 1)[None]  # depth r needs r − 1 earlier entries
        log_q = (out @ kept_rows.T).float().log_softmax(-1)
        per_entry = 0.0
        if config.loss in ("kl", "kl+tv"):
            per_entry = per_entry - (target_p * log_q).sum(-1)
        if config.loss in ("tv", "kl+tv"):
            per_entry = per_entry + 1 - torch.minimum(target_p, log_q.exp()).sum(-1)
        losses.append(torch.where(mask, per_entry, 0.0).sum() / mask.sum().clamp(min=1))
    total = sum(config.depth_weight ** r * loss for r, loss in enumerate(losses))
    return total, [float(loss.detach()) for loss in losses]


@torch.no_grad()
def evaluate(head: EagleHead, sequences: list[Sequence], embedding: Tensor, head_rows: Tensor, kept: Tensor,
             config: EagleConfig, depths: int | None = None) -> dict[str, list[float]]:
    """Mean per-token acceptance at each depth, per temperature ('greedy': argmax agreement)."""
    depths = depths or config.unroll
    sums: dict[str, list[float]] = {}
    counts = [0] * depths
    for start in range(0, len(sequences), 4):
        batch = make_batch(sequences[start : start + 4], config.sequence, config.fused)
        outputs = head.unrolled(batch.features, embedding[batch.tokens], batch.positions, batch.valid, depths)
        target_logits = batch.target_features @ head_rows.T  # [B, T, V] full vocabulary
        # The target's side once per batch: its law at each temperature on the kept tokens, its argmax.
        target_side = {t: target_logits.argmax(-1) if t == 0 else (target_logits / t).softmax(-1)[..., kept]
                       for t in config.temperatures}
        del target_logits
        index = torch.arange(batch.tokens.shape[1])
        for step, out in enumerate(outputs, start=1):
            mask = batch.loss_mask & (index >= step - 1)[None]
            draft_logits = out @ head_rows[kept].T
            counts[step - 1] += int(mask.sum())
            for temperature in config.temperatures:
                label = "greedy" if temperature == 0 else f"T={temperature:g}"
                if temperature == 0:
                    agree = kept[draft_logits.argmax(-1)] == target_side[0]
                    value = float((agree & mask).sum())
                else:
                    q = (draft_logits / temperature).softmax(-1)
                    value = float((torch.minimum(target_side[temperature], q).sum(-1) * mask).sum())
                sums.setdefault(label, [0.0] * depths)[step - 1] += value
    return {label: [v / max(c, 1) for v, c in zip(values, counts)] for label, values in sums.items()}


def _target_tensors(target) -> tuple[object, Tensor, Tensor, dict | None]:
    """The target's transformers config, embedding and LM head rows (float32), and its state if dense."""
    from spectr.drafters.trained import _config_and_weights

    hf_config, weight = _config_and_weights(target)
    embedding = weight("model.embed_tokens.weight")
    head_rows = embedding if hf_config.tie_word_embeddings else weight("lm_head.weight")
    return hf_config, embedding, head_rows, weight


def use_bf16(config: EagleConfig) -> bool:
    """bf16 autocast pays only with bf16 arithmetic: without AVX-512 BF16 / AMX a CPU emulates it, and a
    [4096 × 576] · [576 × 7680] product runs 8× slower than in float32 (measured on an AVX2 EPYC)."""
    if config.bf16 is not None:
        return config.bf16
    from spectr.checks import machine

    return bool({"avx512_bf16", "amx_int8"} & set(machine().simd))


def train(config: EagleConfig, target, train_sequences: list[Sequence], eval_sequences: list[Sequence],
          output: Path, resume: bool = True, progress: Callable[[int, float], None] | None = None,
          log=print, extra: dict | None = None, deadline: float | None = None, stop_at: int | None = None,
          feature_layers: tuple[int, ...] = ()) -> dict:
    """Train the head around `target` (a loaded model or a transformers model) and export it to `output`
    as it goes. Stops at config.steps, or earlier at the time.time() `deadline` or after step `stop_at`
    (with a checkpoint: a resumed run then goes on exactly as an uninterrupted one would).
    feature_layers: the target layers the samples' `layers` hold (for a fused head)."""
    from spectr.models.llama import rotary_tables

    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if config.fused and not feature_layers:
        raise ValueError("a fused head needs samples with the target's layers (feature_layers)")
    torch.manual_seed(config.seed)
    output.mkdir(parents=True, exist_ok=True)
    hf_config, embedding, head_rows, weight = _target_tensors(target)
    identity = target_identity(target)
    checkpoint = output / CHECKPOINT
    saved = torch.load(checkpoint, weights_only=False) if resume and checkpoint.exists() else None
    if saved is not None:
        kept, vocabulary = saved["kept"], saved["vocabulary"]
    else:
        kept, vocabulary = choose_vocabulary(train_sequences, head_rows, config)
    covered = sum(int(torch.isin(s.tokens[s.prompt_length:], kept).sum()) for s in eval_sequences)
    total = sum(s.tokens.numel() - s.prompt_length for s in eval_sequences)
    vocabulary["held_out_token_coverage"] = round(covered / max(total, 1), 4)
    log(f"kept vocabulary: {vocabulary['rows']} rows hold {vocabulary['mass']:.4f} of the target's mass; "
        f"they cover {vocabulary['held_out_token_coverage']:.4f} of held-out sampled tokens")
    kept_rows = head_rows[kept]
    rotary = rotary_tables(hf_config, hf_config.max_position_embeddings)
    head = EagleHead(hf_config, rotary, fused_layers=len(feature_layers) if config.fused else 0)
    if config.init_from_layer is not None:
        layer = config.init_from_layer % hf_config.num_hidden_layers
        head.init_from({name: weight(name) for name in _layer_names(layer)}, layer)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=0.0)
    history: list[dict] = []
    step = 0
    if saved is not None:
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history = saved["step"], saved["history"]
        log(f"resumed at step {step}")
    eval_set = eval_sequences[: config.eval_sequences]
    bf16 = use_bf16(config)

    def save() -> None:
        torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "history": history, "kept": kept, "vocabulary": vocabulary}, checkpoint)
        # The exported weights are the best so far on held-out text (first draft token, T = 1).
        scores = [h["acceptance"]["T=1"][0] for h in history if h["acceptance"] is not None]
        export(head, kept, config, history, output, identity, {**(extra or {}), "vocabulary": vocabulary},
               weights=bool(scores) and scores[-1] >= max(scores), feature_layers=feature_layers)

    if step == 0:
        history.append({"step": 0, "tokens": 0, "loss": None, "seconds": 0.0,
                        "acceptance": evaluate(head, eval_set, embedding, head_rows, kept, config)})
        log(f"step 0: held-out acceptance {_brief(history[-1]['acceptance'])}")
    tokens_seen = history[-1]["tokens"]
    seconds = history[-1].get("seconds", 0.0)
    started = time.time()
    while step < config.steps:
        if (deadline is not None and time.time() >= deadline) or (stop_at is not None and step >= stop_at):
            log(f"stopping at step {step} of {config.steps}: checkpointed; rerun to go on")
            history[-1]["acceptance"] = history[-1]["acceptance"] or evaluate(
                head, eval_set, embedding, head_rows, kept, config)
            save()
            break
        batch = batch_at(train_sequences, step, config)
        rate = config.learning_rate * min(1.0, (step + 1) / config.warmup) * 0.5 * (
            1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = rate
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, per_depth = head_losses(head, batch, embedding, kept_rows, config)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += int(batch.loss_mask.sum())
        history.append({"step": step, "tokens": tokens_seen, "loss": float(loss.detach()), "depth_losses": per_depth,
                        "seconds": round(seconds + time.time() - started, 1), "acceptance": None})
        if progress is not None:
            progress(step, float(loss.detach()))
        if step % config.checkpoint_every == 0 or step == config.steps:
            history[-1]["acceptance"] = evaluate(head, eval_set, embedding, head_rows, kept, config)
            log(f"step {step} ({tokens_seen} tokens, {history[-1]['seconds']:.0f} s): loss {float(loss.detach()):.4f}, "
                f"held-out acceptance {_brief(history[-1]['acceptance'])}")
            save()
    return history[-1]


def _brief(acceptance: dict[str, list[float]]) -> str:
    return "; ".join(f"{label} " + " ".join(f"{v:.3f}" for v in values) for label, values in acceptance.items())


def _layer_names(layer: int) -> list[str]:
    prefix = f"model.layers.{layer}."
    return [prefix + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        prefix + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")] + [
        prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight", "model.norm.weight"]


def export(head: EagleHead, kept: Tensor, config: EagleConfig, history: list[dict], output: Path, target: dict,
           extra: dict | None = None, weights: bool = True, feature_layers: tuple[int, ...] = ()) -> None:
    """The shippable head (bf16 weights + the kept token ids) and a manifest with the recipe, the curve
    and the identity of its target (`drafters.trained.target_identity`).

    weights=False updates only the manifest (the weights on disk stay those of a better checkpoint).
    """
    output.mkdir(parents=True, exist_ok=True)
    if weights or not (output / WEIGHTS).exists():
        tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in head.export_state().items()}
        tensors["kept_tokens"] = kept.to(torch.int32)
        save_file(tensors, str(output / WEIGHTS))
    evaluated = [h for h in history if h["acceptance"] is not None]
    exported = max(evaluated, key=lambda h: h["acceptance"]["T=1"][0]) if evaluated else None
    manifest = {"format": FORMAT, "kind": "eagle", "target": target, "layers": 1,
                "feature_layers": list(feature_layers) if head.fused_layers else [],
                "recipe": asdict(config), **(extra or {}),
                "history": evaluated, "exported_step": exported["step"] if exported else None,
                "held_out_acceptance": exported["acceptance"] if exported else None}
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if len(evaluated) > 1:
        plot_learning_curve(manifest, output / "learning-curve.png")


def plot_learning_curve(manifest: dict, path: Path) -> None:
    """Held-out acceptance per depth (T = 1) against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [h for h in manifest["history"] if h.get("acceptance")]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    depths = len(history[0]["acceptance"]["T=1"])
    for depth in range(depths):
        axis.plot([h["tokens"] for h in history], [h["acceptance"]["T=1"][depth] for h in history],
                  marker="o", markersize=3, label=f"depth {depth + 1}")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("held-out acceptance, T = 1")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_recipe(target: str | None, output: Path, config: EagleConfig, data, *, samples: Path | None = None,
               resume: bool = True, hours: float | None = None, progress=None, log=print) -> dict | None:
    """The whole recipe: the target samples its training data (`samples.DataRecipe` `data`, into
    `samples`, default output/samples), then the head trains on it. Both stages resume where they
    stopped (shards, checkpoint); `hours` bounds this run (then rerun to go on).
    progress(stage, done, total) reports either stage. None if the time ran out while sampling."""
    from spectr.checks import machine
    from spectr.models.loading import load_model, stop_token_ids
    from spectr.training.samples import default_feature_layers, generate_dataset, load_sequences

    deadline = None if hours is None else time.time() + hours * 3600
    samples = samples or output / "samples"
    model = load_model(target, precision=data.precision, fallback=False)
    layers = data.layers or default_feature_layers(model.lm.config.num_layers)
    log(f"sampling until {data.tokens} sampled tokens are stored in {samples} ...")
    manifest = generate_dataset(
        model.lm, model.tokenizer, samples, data, stop_token_ids(model.tokenizer), deadline=deadline, log=log,
        progress=None if progress is None else (
            lambda chunk, step: progress(f"sample chunk {chunk}", step, data.chunk_steps)))
    stored = sum(shard["sampled tokens"] for shard in manifest["shards"])
    if stored < data.tokens:
        log(f"time is up while sampling ({stored} of {data.tokens} tokens stored); rerun to go on")
        return None
    train_sequences = load_sequences(samples, held_out=False)
    eval_sequences = load_sequences(samples, held_out=True)
    log(f"training on {len(train_sequences)} sequences ({stored} sampled tokens in all) ...")
    return train(config, model, train_sequences, eval_sequences, output, resume=resume, log=log,
                 progress=None if progress is None else (lambda step, loss: progress("train", step, config.steps)),
                 extra={"samples": {**asdict(data), "stored_tokens": stored,
                                    "sampling_seconds": round(sum(s["seconds"] for s in manifest["shards"]))},
                        "made_on": f"{machine().describe()}; {torch.get_num_threads()} threads"},
                 deadline=deadline, feature_layers=tuple(layers))
