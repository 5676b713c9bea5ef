"""An EAGLE-style draft head, trained on the target's own samples (`samples.py`).

The head is one Llama decoder layer whose input at position j is
    fc([norm(h_{j-1}) ; norm(embed(x_j))])
where h_{j-1} is the target's final-norm hidden state after x_{j-1}: the head
sees everything the target knows about the prefix, plus the newest token. Its
output, after a final norm, is its guess ĥ_j of the target's next feature; the
target's own LM head rows (restricted to the `vocab` most frequent sampled
tokens, q = 0 elsewhere: still exact) turn it into the draft distribution of
x_{j+1}. While drafting, a draft feeds its own ĥ back as the next feature.

Training sees the same thing ("unrolled" training, as EAGLE-3 does): step 1
reads true features; step r reads step r−1's outputs, attending to true-feature
entries up to r−1 positions back and to its own chain of predicted entries
since, exactly the attention pattern of the r-th draft token at inference.
Loss at every step: cross-entropy to the target's exact distribution on the
kept tokens, −Σ_{v∈S} p(v) log q(v), with log p(v) = W_v·h − logsumexp (the
sample files store both). Held-out metric: per-token acceptance Σ min(p, q) at
each draft depth, at T = 1, 0.7 and greedy.
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
FORMAT = "spectr-eagle-1"


@dataclass
class EagleConfig:
    vocab: int = 12288  # head rows kept: the most frequent sampled tokens (0.93 of sampled tokens here)
    unroll: int = 3  # draft depths trained together
    depth_weight: float = 0.8  # loss weight of depth r is depth_weight ** (r - 1)
    sequence: int = 320  # longest training sequence (longer ones are cut)
    batch_tokens: int = 4096
    steps: int = 600
    learning_rate: float = 1e-3
    warmup: int = 30
    seed: int = 0
    checkpoint_every: int = 60
    init_from_layer: int | None = None  # a target layer to start the head's layer from (None: random, as EAGLE)
    eval_sequences: int = 48
    temperatures: tuple[float, ...] = field(default=(1.0, 0.7, 0.0))


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class EagleHead(nn.Module):
    """The trainable head: fc, one decoder layer, final norm (names as in a Llama state dict)."""

    def __init__(self, target_config, rotary: tuple[Tensor, Tensor]):
        super().__init__()
        c = target_config
        d, e = c.hidden_size, c.hidden_size // c.num_attention_heads
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, e
        self.eps = c.rms_norm_eps
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

    def _rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, T, E]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def unrolled(self, features: Tensor, embeddings: Tensor, positions: Tensor, valid: Tensor, steps: int):
        """Outputs of draft depths 1..steps at every entry. features/embeddings [B, T, D], valid [B, T].

        Depth r at entry j reads depth r−1's output at j−1, and attends to depth-1 entries at
        ≤ j−r+1 and to the depth-u entry at j−r+u for u = 2..r (its own chain of drafts).
        """
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
        """Weights under the names spectr's forward reads (layer 0 of a 1-layer model, plus fc)."""
        p = "model.layers.0."
        state = {"model.fc.weight": self.fc.weight, "model.norm.weight": self.norm,
                 "model.feature_norm.weight": self.feature_norm, "model.embedding_norm.weight": self.embedding_norm,
                 p + "input_layernorm.weight": self.input_layernorm,
                 p + "post_attention_layernorm.weight": self.post_attention_layernorm}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = getattr(self, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[p + f"mlp.{name}.weight"] = getattr(self, name).weight
        return {name: tensor.detach() for name, tensor in state.items()}


@dataclass
class Batch:
    features: Tensor  # [B, T, D] h_{j-1} (true)
    tokens: Tensor  # [B, T] x_j
    positions: Tensor  # [B, T] j
    valid: Tensor  # [B, T] a real entry
    target_features: Tensor  # [B, T, D] h_j: the target's feature that predicts x_{j+1}
    target_lse: Tensor  # [B, T]
    loss_mask: Tensor  # [B, T] x_{j+1} exists and was sampled by the target (not prompt text)


def make_batch(sequences: list[Sequence], max_length: int) -> Batch:
    """Entries e = 0..n-2 of each sequence: input (h_e, x_{e+1}) at position e+1, target h_{e+1}."""
    length = min(max_length, max(s.tokens.numel() - 1 for s in sequences))
    d = sequences[0].hidden.shape[-1]
    b = len(sequences)
    batch = Batch(
        features=torch.zeros(b, length, d), tokens=torch.zeros(b, length, dtype=torch.long),
        positions=torch.zeros(b, length, dtype=torch.long), valid=torch.zeros(b, length, dtype=torch.bool),
        target_features=torch.zeros(b, length, d), target_lse=torch.zeros(b, length),
        loss_mask=torch.zeros(b, length, dtype=torch.bool),
    )
    for row, s in enumerate(sequences):
        n = min(s.tokens.numel() - 1, length)  # entries
        batch.features[row, :n] = s.hidden[:n].float()
        batch.tokens[row, :n] = s.tokens[1 : n + 1]
        batch.positions[row, :n] = torch.arange(1, n + 1)
        batch.valid[row, :n] = True
        targets = min(n, s.hidden.shape[0] - 1)  # entry e needs h_{e+1}
        batch.target_features[row, :targets] = s.hidden[1 : targets + 1].float()
        batch.target_lse[row, :targets] = s.lse[1 : targets + 1]
        entry = torch.arange(targets)
        batch.loss_mask[row, :targets] = entry + 2 >= s.prompt_length
    return batch


def batches(sequences: list[Sequence], batch_tokens: int, max_length: int, generator: torch.Generator):
    """Shuffled batches of sequences of similar length, about `batch_tokens` entries each (endless)."""
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        # Sort within windows of 64 so each batch pads little but the order stays random.
        for start in range(0, len(order), 64):
            window = sorted(order[start : start + 64], key=lambda i: sequences[i].tokens.numel())
            group: list[int] = []
            for i in window:
                group.append(i)
                longest = min(max_length, max(sequences[j].tokens.numel() for j in group))
                if longest * len(group) >= batch_tokens:
                    yield make_batch([sequences[j] for j in group], max_length)
                    group = []
            if group:
                yield make_batch([sequences[j] for j in group], max_length)


def frequent_tokens(sequences: list[Sequence], count: int, vocab_size: int) -> Tensor:
    """The `count` tokens the target samples most often (in its sampled parts), ascending ids."""
    frequency = torch.zeros(vocab_size, dtype=torch.long)
    for s in sequences:
        frequency += torch.bincount(s.tokens[s.prompt_length :], minlength=vocab_size)
    return frequency.topk(count).indices.sort().values


def head_losses(head: EagleHead, batch: Batch, embedding: Tensor, kept_rows: Tensor, config: EagleConfig):
    """Per-depth cross-entropy to the target on the kept tokens, and the weighted total."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the teacher in full precision
        target_p = (batch.target_features @ kept_rows.T - batch.target_lse[..., None]).exp()  # [B, T, K]
    outputs = head.unrolled(batch.features, embedding[batch.tokens], batch.positions, batch.valid,
                            config.unroll)
    index = torch.arange(batch.tokens.shape[1])
    losses = []
    for step, out in enumerate(outputs, start=1):
        mask = batch.loss_mask & (index >= step - 1)[None]  # depth r needs r − 1 earlier entries
        log_q = (out @ kept_rows.T).float().log_softmax(-1)
        ce = -(target_p * log_q).sum(-1)
        losses.append((ce * mask).sum() / mask.sum().clamp(min=1))
    total = sum(config.depth_weight ** r * loss for r, loss in enumerate(losses))
    return total, [float(loss.detach()) for loss in losses]


@torch.no_grad()
def evaluate(head: EagleHead, sequences: list[Sequence], embedding: Tensor, head_rows: Tensor, kept: Tensor,
             config: EagleConfig) -> dict[str, list[float]]:
    """Mean per-token acceptance at each depth, per temperature ('greedy': argmax agreement)."""
    sums: dict[str, list[float]] = {}
    counts = [0] * config.unroll
    for start in range(0, len(sequences), 4):
        batch = make_batch(sequences[start : start + 4], config.sequence)
        outputs = head.unrolled(batch.features, embedding[batch.tokens], batch.positions, batch.valid,
                                config.unroll)
        target_logits = batch.target_features @ head_rows.T  # [B, T, V] full vocabulary
        index = torch.arange(batch.tokens.shape[1])
        for step, out in enumerate(outputs, start=1):
            mask = batch.loss_mask & (index >= step - 1)[None]
            draft_logits = out @ head_rows[kept].T
            counts[step - 1] += int(mask.sum())
            for temperature in config.temperatures:
                label = "greedy" if temperature == 0 else f"T={temperature:g}"
                if temperature == 0:
                    agree = kept[draft_logits.argmax(-1)] == target_logits.argmax(-1)
                    value = float((agree & mask).sum())
                else:
                    p = (target_logits / temperature).softmax(-1)[..., kept]
                    q = (draft_logits / temperature).softmax(-1)
                    value = float((torch.minimum(p, q).sum(-1) * mask).sum())
                sums.setdefault(label, [0.0] * config.unroll)[step - 1] += value
    return {label: [v / max(c, 1) for v, c in zip(values, counts)] for label, values in sums.items()}


def train(config: EagleConfig, target, train_sequences: list[Sequence], eval_sequences: list[Sequence],
          output: Path, resume: bool = True, progress: Callable[[int, float], None] | None = None,
          log=print, extra: dict | None = None) -> dict:
    """Train the head around `target` (a transformers model) and export it to `output` as it goes."""
    from spectr.models.llama import rotary_tables

    torch.manual_seed(config.seed)
    output.mkdir(parents=True, exist_ok=True)
    hf_config = target.config
    target_state = target.state_dict()
    embedding = target_state["model.embed_tokens.weight"].float()
    head_rows = (embedding if hf_config.tie_word_embeddings else target_state["lm_head.weight"].float())
    kept = frequent_tokens(train_sequences, config.vocab, hf_config.vocab_size)
    identity = target_identity(target)
    kept_rows = head_rows[kept]
    covered = sum(int(torch.isin(s.tokens[s.prompt_length:], kept).sum()) for s in eval_sequences)
    total = sum(s.tokens.numel() - s.prompt_length for s in eval_sequences)
    log(f"kept vocabulary: {config.vocab} tokens cover {covered / max(total, 1):.4f} of held-out sampled tokens")
    rotary = rotary_tables(hf_config, hf_config.max_position_embeddings)
    head = EagleHead(hf_config, rotary)
    if config.init_from_layer is not None:
        head.init_from(target_state, config.init_from_layer % hf_config.num_hidden_layers)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=0.0)
    history: list[dict] = []
    step = 0
    checkpoint = output / CHECKPOINT
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history = saved["step"], saved["history"]
        log(f"resumed at step {step}")
    generator = torch.Generator().manual_seed(config.seed + step)
    stream = batches(train_sequences, config.batch_tokens, config.sequence, generator)
    eval_set = eval_sequences[: config.eval_sequences]
    if step == 0:
        history.append({"step": 0, "tokens": 0, "loss": None,
                        "acceptance": evaluate(head, eval_set, embedding, head_rows, kept, config)})
        log(f"step 0: held-out acceptance {history[-1]['acceptance']}")
    tokens_seen = history[-1]["tokens"]
    started = time.time()
    while step < config.steps:
        batch = next(stream)
        rate = config.learning_rate * min(1.0, (step + 1) / config.warmup) * 0.5 * (
            1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = rate
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, per_depth = head_losses(head, batch, embedding, kept_rows, config)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += int(batch.loss_mask.sum())
        history.append({"step": step, "tokens": tokens_seen, "loss": float(loss.detach()), "depth_losses": per_depth,
                        "acceptance": None})
        if progress is not None:
            progress(step, float(loss.detach()))
        if step % config.checkpoint_every == 0 or step == config.steps:
            history[-1]["acceptance"] = evaluate(head, eval_set, embedding, head_rows, kept, config)
            log(f"step {step} ({tokens_seen} tokens, {time.time() - started:.0f} s): loss {float(loss):.4f}, "
                f"held-out acceptance {history[-1]['acceptance']}")
            torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "history": history}, checkpoint)
            # The exported weights are the best so far on held-out text (first draft token, T = 1).
            scores = [h["acceptance"]["T=1"][0] for h in history if h["acceptance"] is not None]
            export(head, kept, config, history, output, identity, extra, weights=scores[-1] >= max(scores))
    return history[-1]


def export(head: EagleHead, kept: Tensor, config: EagleConfig, history: list[dict], output: Path, target: dict,
           extra: dict | None = None, weights: bool = True) -> None:
    """The shippable head (bf16 weights + the kept token ids) and a manifest with the recipe, the curve
    and the identity of its target (`drafters.trained.target_identity`).

    weights=False updates only the manifest (the weights on disk stay those of a better checkpoint).
    """
    if weights or not (output / WEIGHTS).exists():
        tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in head.export_state().items()}
        tensors["kept_tokens"] = kept.to(torch.int32)
        save_file(tensors, str(output / WEIGHTS))
    evaluated = [h for h in history if h["acceptance"] is not None]
    exported = max(evaluated, key=lambda h: h["acceptance"]["T=1"][0]) if evaluated else None
    manifest = {"format": FORMAT, "kind": "eagle", "target": target, "layers": 1, "recipe": asdict(config), **(extra or {}),
                "history": evaluated, "exported_step": exported["step"] if exported else None,
                "held_out_acceptance": exported["acceptance"] if exported else None}
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1))


@dataclass
class SampleRecipe:
    train_tokens: int = 275_823  # tokens the target samples for training (5 shards of ~50k here)
    heldout_tokens: int = 24_000  # and for the held-out measurement (other instructions and files)
    batch: int = 48  # sequences sampled side by side
    max_new_tokens: int = 256
    raw_fraction: float = 0.25  # share of raw-text continuations (the rest: chat answers)
    precision: str = "bf16"  # the target's precision while sampling (and so the features')


def run_recipe(target: str | None, output: Path, config: EagleConfig, recipe: SampleRecipe,
               resume: bool = True, progress=None, log=print) -> dict:
    """The whole recipe: the target samples its training data, then the head trains on it.

    Both stages resume where they stopped (sample shards, training checkpoint).
    progress(stage, done, total) reports either stage.
    """
    from spectr.api import _stop_token_ids
    from spectr.models.loading import load_model
    from spectr.training.samples import generate_dataset, load_sequences

    model = load_model(target, precision=recipe.precision, fallback=False)
    stop_ids = _stop_token_ids(model.tokenizer)
    started = time.time()
    for split, tokens, held_out, seed in (("heldout", recipe.heldout_tokens, True, config.seed + 1),
                                          ("train", recipe.train_tokens, False, config.seed)):
        log(f"sampling {tokens} {split} tokens from the target ...")
        generate_dataset(
            model.lm, model.tokenizer, output / "samples" / split, tokens, batch=recipe.batch,
            max_new_tokens=recipe.max_new_tokens, seed=seed, held_out=held_out, raw_fraction=recipe.raw_fraction,
            stop_ids=stop_ids, log=log,
            progress=None if progress is None else (lambda done, s=split, t=tokens: progress(f"sample {s}", done, t)),
        )
    sampled = time.time() - started
    train_sequences = load_sequences(output / "samples" / "train")
    eval_sequences = load_sequences(output / "samples" / "heldout")
    log(f"training on {len(train_sequences)} sequences ...")
    final = train(config, model.hf_model, train_sequences, eval_sequences, output, resume=resume, log=log,
                  progress=None if progress is None else (lambda step, loss: progress("train", step, config.steps)),
                  extra={"samples": asdict(recipe), "sampling_seconds": round(sampled)})
    return final
