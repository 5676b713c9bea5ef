"""`spectr train-draft`: distil a small draft from the target (self-distillation on offline text).

The draft is a few Llama layers between the target's own token embedding and
the target's LM head restricted to the most frequent tokens. Only its layers
and final norm are trained and shipped; at load time the embedding and the
head rows come from the target itself. A reduced head keeps the draft exact
(q is simply zero outside the kept tokens) and cheap.

Loss: cross-entropy of the draft's distribution against the target's full
next-token distribution (temperature 1), over the kept tokens:
    −Σ_{x ∈ kept} p_target(x) · log q_draft(x).
Held-out metric: per-token acceptance at T = 1, Σ_x min(p(x), q(x)) — exactly
the acceptance of standard speculative sampling with one draft.
"""

from dataclasses import asdict, dataclass
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaModel

from spectr.drafters.trained import MANIFEST, WEIGHTS, target_identity
from spectr.models.llama import LlamaForward
from spectr.models.loading import load_transformers, native_forward, resolve_source
from spectr.training.corpus import token_chunks

CHECKPOINT = "checkpoint.pt"


@dataclass
class DistillConfig:
    target: str | None = None
    layers: int = 2
    vocab: int = 8192  # head rows kept: the most frequent tokens of the training text
    sequence: int = 256
    batch: int = 8
    steps: int = 2000
    learning_rate: float = 1e-3
    warmup: int = 50
    seed: int = 0
    checkpoint_every: int = 50
    eval_tokens: int = 16384
    train_tokens_limit: int | None = None  # cap on the corpus read (None: all of it)
    teacher_precision: str = "bf16"


def pick_layers(total: int, count: int) -> list[int]:
    """Target layers the draft's layers start from: the first ones, whose input is the embedding
    (a later layer expects a deeper residual stream and only adds noise at the start)."""
    return list(range(min(count, total)))


def build_student(hf_target, config: DistillConfig) -> tuple[LlamaModel, list[int]]:
    source_layers = pick_layers(hf_target.config.num_hidden_layers, config.layers)
    student_config = LlamaConfig(**{**hf_target.config.to_dict(), "num_hidden_layers": config.layers})
    student = LlamaModel(student_config)
    target_state = hf_target.state_dict()
    state = {"embed_tokens.weight": target_state["model.embed_tokens.weight"],
             "norm.weight": target_state["model.norm.weight"]}
    for index, source in enumerate(source_layers):
        prefix = f"model.layers.{source}."
        for name, tensor in target_state.items():
            if name.startswith(prefix):
                state[f"layers.{index}.{name[len(prefix):]}"] = tensor
    student.load_state_dict(state, strict=False)
    student.embed_tokens.weight.requires_grad_(False)  # the target's, at load time too
    return student, source_layers


def frequent_tokens(chunks: torch.Tensor, count: int, vocab_size: int) -> torch.Tensor:
    """The `count` most frequent token ids of the training chunks, ascending. [count]"""
    frequency = torch.bincount(chunks.flatten(), minlength=vocab_size)
    return frequency.topk(count).indices.sort().values


def teacher_targets(teacher: LlamaForward, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """p_target restricted to the kept tokens (not renormalised). tokens [B, T] -> [B, T, K] float32."""
    rows = []
    for row in tokens:
        logits = teacher.forward(row[None], torch.arange(row.numel()), teacher.new_cache(row.numel())).logits[0]
        rows.append((logits[:, kept] - logits.logsumexp(-1, keepdim=True)).exp())
    return torch.stack(rows)


def student_log_probs(student: LlamaModel, head: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    hidden = student(input_ids=tokens).last_hidden_state  # [B, T, D] (after the final norm)
    return F.linear(hidden, head).log_softmax(-1)  # [B, T, K]


def acceptance(student, head, teacher, chunks, kept) -> float:
    """Mean Σ min(p, q) over held-out positions, at temperature 1."""
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens in chunks.split(4):
            target_kept = teacher_targets(teacher, tokens, kept)
            draft = student_log_probs(student, head, tokens).exp()
            total += float(torch.minimum(target_kept, draft).sum(-1).sum())
            count += tokens.numel()
    return total / count


def train(config: DistillConfig, output: Path, resume: bool = True, progress=None, log=print) -> dict:
    torch.manual_seed(config.seed)
    output.mkdir(parents=True, exist_ok=True)
    hf_target, tokenizer = load_transformers(resolve_source(config.target))
    teacher = native_forward(hf_target, config.teacher_precision)
    log("reading the corpus ...")
    train_chunks = token_chunks(tokenizer, config.sequence, held_out=False, limit_tokens=config.train_tokens_limit)
    eval_chunks = token_chunks(tokenizer, config.sequence, held_out=True,
                               limit_tokens=config.eval_tokens)[: max(1, config.eval_tokens // config.sequence)]
    kept = frequent_tokens(train_chunks, config.vocab, hf_target.config.vocab_size)
    student, source_layers = build_student(hf_target, config)
    head = hf_target.state_dict()["model.embed_tokens.weight" if hf_target.config.tie_word_embeddings
                                  else "lm_head.weight"][kept].clone()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    history: list[dict] = []
    step = 0
    checkpoint = output / CHECKPOINT
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        student.load_state_dict(saved["student"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        step, history = saved["step"], saved["history"]
        torch.set_rng_state(saved["rng"])
        log(f"resumed at step {step}")
    order = torch.randperm(train_chunks.shape[0], generator=torch.Generator().manual_seed(config.seed))
    if step == 0:
        history.append({"step": 0, "tokens": 0, "loss": None,
                        "acceptance": acceptance(student, head, teacher, eval_chunks, kept)})
        log(f"step 0: held-out acceptance {history[-1]['acceptance']:.4f}")
    started = time.time()
    while step < config.steps:
        start = (step * config.batch) % order.numel()
        batch = train_chunks[order[start : start + config.batch]]
        with torch.no_grad():
            target_kept = teacher_targets(teacher, batch, kept)
        rate = config.learning_rate * min(1.0, (step + 1) / config.warmup) * 0.5 * (
            1 + math.cos(math.pi * min(step, config.steps) / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = -(target_kept * student_log_probs(student, head, batch)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, "tokens": step * config.batch * config.sequence, "loss": loss.item(),
                        "acceptance": None})
        if progress is not None:
            progress(step, loss.item())
        if step % config.checkpoint_every == 0 or step == config.steps:
            history[-1]["acceptance"] = acceptance(student, head, teacher, eval_chunks, kept)
            log(f"step {step}: loss {loss.item():.4f}, held-out acceptance {history[-1]['acceptance']:.4f}, "
                f"{time.time() - started:.0f} s")
            torch.save({"student": {k: v for k, v in student.state_dict().items() if k != "embed_tokens.weight"},
                        "optimizer": optimizer.state_dict(), "step": step, "history": history,
                        "rng": torch.get_rng_state()}, checkpoint)
            export(student, kept, source_layers, config, history, output, target_identity(hf_target))
    return history[-1]


def export(student: LlamaModel, kept: torch.Tensor, source_layers: list[int], config: DistillConfig,
           history: list[dict], output: Path, target: dict) -> None:
    """The shippable draft: its layers, final norm and kept token ids, plus a manifest with the recipe."""
    tensors = {f"model.{name}": tensor.detach().to(torch.bfloat16).contiguous()
               for name, tensor in student.state_dict().items() if name != "embed_tokens.weight"}
    tensors["kept_tokens"] = kept.to(torch.int32)
    save_file(tensors, str(output / WEIGHTS))
    evaluated = [h for h in history if h["acceptance"] is not None]
    manifest = {"format": "spectr-draft-1", "target": target, "layers": config.layers, "initialised_from_target_layers": source_layers,
                "recipe": asdict(config), "history": evaluated,
                "held_out_acceptance": evaluated[-1]["acceptance"] if evaluated else None}
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1))
