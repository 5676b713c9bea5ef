"""Text the target samples itself, with the target's features: the training data of a draft.

A draft is measured on how well it predicts the target where the target
actually goes, so it is trained there: on the target's own answers (T = 1) to
instructions (`prompts.py`) and its own continuations of offline text
(`corpus.py`). Sampling runs a batch of sequences side by side in spectr's own
forward (left-padded prompts, per-sequence positions and masks), which is
several times faster per token than one sequence at a time on a CPU.

For every position t of every sequence we keep what training needs from the
target, so the target never runs again during training:
  - the token x_t,
  - the final-norm hidden state h_t (the LM head's input; an EAGLE-style head
    reads it as the feature of the prefix up to t), in bf16,
  - logsumexp of the logits at t, so the target's exact log-probabilities of
    any token subset are  W[subset] · h_t − lse_t  (one small matmul).
Shards are written as they fill; a rerun resumes after the last shard.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from spectr.sampling import sample_categorical

SHARD = "shard-{:04d}.pt"


@dataclass
class Sequence:
    tokens: Tensor  # [n] long
    hidden: Tensor  # [n, D] bf16: final-norm hidden state after each token
    lse: Tensor  # [n] float32: logsumexp of the target's logits after each token
    prompt_length: int  # tokens before the sampled part


@torch.inference_mode()
def sample_batch(
    lm, prompts: list[list[int]], max_new_tokens: int, stop_ids: frozenset[int], generator: torch.Generator,
    temperature: float = 1.0,
) -> list[Sequence]:
    """Sample a continuation of each prompt from `lm` at `temperature`, all in one batch."""
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    capacity = width + max_new_tokens
    cache = lm.new_cache(capacity, batch=batch)
    pad = torch.tensor([width - len(p) for p in prompts])
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, pad[row]:] = torch.tensor(prompt)
    columns = torch.arange(width)
    positions = (columns[None] - pad[:, None]).clamp(min=0)
    valid = torch.zeros(batch, capacity, dtype=torch.bool)  # slots holding real tokens
    valid[:, :width] = columns[None] >= pad[:, None]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal[None] & (valid[:, None, :width] | torch.eye(width, dtype=torch.bool)[None])
    out = lm.forward(tokens, positions, cache, mask)
    hidden = [out.hidden.to(torch.bfloat16)]
    lse = [out.logits.logsumexp(-1)]
    last_logits = out.logits[:, -1]
    sampled = []
    finished = torch.zeros(batch, dtype=torch.bool)
    lengths = torch.full((batch,), max_new_tokens)
    for step in range(max_new_tokens):
        probs = torch.softmax(last_logits / temperature, -1)
        token = sample_categorical(probs, generator)[:, 0]
        sampled.append(token)
        for row in range(batch):
            if not finished[row] and int(token[row]) in stop_ids:
                finished[row] = True
                lengths[row] = step + 1
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        valid[:, width + step] = True
        step_mask = valid[:, None, : width + step + 1]
        out = lm.forward(token[:, None], (width - pad + step)[:, None], cache, step_mask)
        hidden.append(out.hidden.to(torch.bfloat16))
        lse.append(out.logits.logsumexp(-1))
        last_logits = out.logits[:, -1]
    sampled = torch.stack(sampled, 1)  # [B, steps]
    hidden = torch.cat(hidden, 1)  # [B, width + steps - 1 (+1 if no early break), D]
    lse = torch.cat(lse, 1)
    sequences = []
    for row in range(batch):
        new = int(min(lengths[row], sampled.shape[1]))
        seq_tokens = torch.cat([tokens[row, pad[row]:], sampled[row, :new]])
        n = seq_tokens.numel()
        # The last sampled token was never run through the target, so it has no hidden state:
        # the sequence keeps n - 1 features (enough: the feature after the last token predicts nothing).
        sequences.append(Sequence(
            tokens=seq_tokens, hidden=hidden[row, pad[row]: pad[row] + n - 1].clone(),
            lse=lse[row, pad[row]: pad[row] + n - 1].clone(), prompt_length=len(prompts[row]),
        ))
    return sequences


def prompt_stream(tokenizer, seed: int, held_out: bool, raw_fraction: float, raw_tokens: int) -> Iterator[list[int]]:
    """Chat-templated instructions, mixed with raw text openings (a `raw_fraction` share) to continue."""
    import random

    from spectr.training import corpus, prompts

    rng = random.Random(seed + 1)
    chat = prompts.instructions(seed, held_out=held_out)
    documents = [text for name, text in corpus.documents() if corpus.is_held_out(name) == held_out]
    while True:
        if rng.random() < raw_fraction:
            text = rng.choice(documents)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) <= raw_tokens:
                continue
            start = rng.randrange(0, len(ids) - raw_tokens)
            yield ids[start : start + raw_tokens]
        else:
            messages = [{"role": "user", "content": next(chat)}]
            yield tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)


def generate_dataset(
    lm, tokenizer, output: Path, tokens: int, *, batch: int = 16, max_new_tokens: int = 256, seed: int = 0,
    held_out: bool = False, raw_fraction: float = 0.25, raw_tokens: int = 64, shard_tokens: int = 50_000,
    stop_ids: frozenset[int] = frozenset(), progress: Callable[[int], None] | None = None, log=print,
) -> dict:
    """Sample until `tokens` sampled tokens are stored in shards under `output`; resumable."""
    output.mkdir(parents=True, exist_ok=True)
    shards = sorted(output.glob("shard-*.pt"))
    saved = [torch.load(s, weights_only=False) for s in shards]
    done = sum(s["sampled_tokens"] for s in saved)
    used = sum(s["prompts"] for s in saved)
    del saved
    # Each shard has its own seeds, so a resumed run continues the same data as an uninterrupted one.
    stream = prompt_stream(tokenizer, seed, held_out, raw_fraction, raw_tokens)
    pending: list[Sequence] = []
    pending_tokens = 0
    index = len(shards)
    for _ in range(used):  # a resumed run goes on with the prompts the shards have not used
        next(stream)
    shard_prompts = 0
    started = time.time()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    while done < tokens:
        prompts = [next(stream) for _ in range(batch)]
        shard_prompts += batch
        for sequence in sample_batch(lm, prompts, max_new_tokens, stop_ids, generator):
            pending.append(sequence)
            new = sequence.tokens.numel() - sequence.prompt_length
            pending_tokens += new
            done += new
        if progress is not None:
            progress(done)
        if pending_tokens >= shard_tokens or done >= tokens:
            torch.save({"sequences": [vars(s) for s in pending], "sampled_tokens": pending_tokens,
                        "prompts": shard_prompts}, output / SHARD.format(index))
            log(f"shard {index}: {len(pending)} sequences, {pending_tokens} sampled tokens, "
                f"{done / max(time.time() - started, 1e-9):.0f} tok/s overall")
            index += 1
            pending, pending_tokens, shard_prompts = [], 0, 0
    summary = {"sampled_tokens": done, "shards": index, "seed": seed, "held_out": held_out,
               "raw_fraction": raw_fraction, "max_new_tokens": max_new_tokens, "batch": batch}
    (output / "samples.json").write_text(json.dumps(summary, indent=1))
    return summary


def load_sequences(folder: Path) -> list[Sequence]:
    sequences = []
    for shard in sorted(Path(folder).glob("shard-*.pt")):
        sequences.extend(Sequence(**s) for s in torch.load(shard, weights_only=False)["sequences"])
    return sequences
