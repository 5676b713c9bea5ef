"""Text the target samples itself, with the target's features: the training data of a draft.

A draft is measured on how well it predicts the target where the target
actually goes, so it is trained there: on the target's own answers to chat
prompts and its own continuations of offline text. Three prompt sources are
mixed (`DataRecipe.mix`):
  - magpie: the target writes the user message itself from the bare chat
    template (`magpie.py`), then answers it;
  - instruction: template instructions (`prompts.py`), answered;
  - text: an opening of offline text (`corpus.py`), continued.
Answers are sampled at the temperatures people use (`DataRecipe.temperatures`);
whatever the sampling temperature, training reads the target's full law.

Generation is one batch of `rows` sequences over spectr's fast forward, one
token per row per step: a row forces its prompt tokens and then samples,
and when its sequence ends it starts the next one in the same cache (its
mask hides the slots before), so no row idles. A chunk of `chunk_steps`
steps fills one shard; sequences still open at the end are kept as they are
(a cut answer is still the target's text). Every chunk draws from its own
seeds, so a resumed run writes the same shards as an uninterrupted one.

For every position t of every sequence, the shard keeps what training needs,
so the target never runs again:
  - the token x_t;
  - the final-norm hidden state h_t (the LM head's input: the target's exact
    log-probabilities of any token subset are  W[subset]·h_t − lse_t);
  - logsumexp lse_t of the logits at t (NaN where nothing is sampled next);
  - the residual stream after a low, a middle and a high layer
    (`default_feature_layers`), which a fused-feature head reads.
Each prompt goes to the training or the held-out split by a hash of its
text (`prompts.is_held_out`; raw text by its document's name), so held-out
prompts are never trained on. `samples.json` is the manifest.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
import json
import random
import time
from pathlib import Path

import torch
from torch import Tensor

from spectr.sampling import sample_categorical

SHARD = "shard-{:04d}.pt"
MANIFEST = "samples.json"
FORMAT = "spectr-samples-2"
_NO_ROWS = torch.tensor([], dtype=torch.long)


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """A low, a middle and a high layer (EAGLE-3 reads the inputs of layers 2, L/2 and L−3): (1, 14, 26)
    for 30 layers (fewer for a model of under 3 layers). Indices name the layer whose output is taken."""
    return tuple(sorted({min(1, num_layers - 1), max(num_layers // 2 - 1, 0), max(num_layers - 4, 0)}))


@dataclass(frozen=True)
class DataRecipe:
    tokens: int = 5_000_000  # sampled tokens to store (answers and continuations, both splits)
    rows: int = 64  # sequences sampled side by side
    chunk_steps: int = 1024  # steps per chunk (one shard); also the cache's capacity
    mix: tuple[tuple[str, float], ...] = (("magpie", 0.6), ("instruction", 0.25), ("text", 0.15))
    temperatures: tuple[tuple[float, float], ...] = ((1.0, 0.5), (0.7, 0.3), (0.0, 0.2))  # (T, share); 0 greedy
    max_answer_tokens: int = 384
    max_user_tokens: int = 96  # a written user message longer than this is dropped
    text_tokens: int = 64  # opening of a raw-text prompt
    max_text_tokens: int = 192
    min_kept_tokens: int = 16  # a sequence cut by the chunk's end keeps at least this many sampled tokens
    duplicate_threshold: float = 0.7
    layers: tuple[int, ...] | None = None  # None: default_feature_layers(the target's layers)
    precision: str = "native"  # the target's while sampling: the features must be those drafting will read
    held_out_only: bool = False  # only prompts of the held-out split (a measurement set, e.g. for studies)
    seed: int = 0


@dataclass
class Sequence:
    tokens: Tensor  # [n] long
    hidden: Tensor  # [n - 1, D] bf16: final-norm hidden state after each token but the last
    lse: Tensor  # [n - 1] float32: logsumexp of the target's logits there (NaN inside the prompt)
    prompt_length: int  # tokens before the sampled part
    layers: Tensor | None = None  # [n - 1, len(recipe layers), D] bf16
    temperature: float = 1.0
    source: str = "instruction"
    held_out: bool = False
    prompt: str = ""  # the chat prompt's text, or "document:<name>" for raw text: what the split hashes


@dataclass
class _Row:
    tokens: list[int]
    begin: int  # the cache slot of tokens[0]
    phase: str  # "user" (writing a prompt), "answer" (sampling)
    source: str
    temperature: float
    held_out: bool = False
    prompt_length: int = 0
    user_start: int = 0
    prompt_text: str = ""
    fed: int = 0  # tokens forwarded so far


class _Sources:
    """Deterministic prompt programs for one chunk."""

    def __init__(self, tokenizer, recipe: DataRecipe, chunk: int, documents: list[tuple[str, str]], turn):
        from spectr.training import corpus, prompts

        self.tokenizer, self.recipe, self.turn = tokenizer, recipe, turn
        self.rng = random.Random(f"{recipe.seed}-{chunk}")
        only = True if recipe.held_out_only else None
        self.instructions = prompts.instructions(recipe.seed * 1_000_003 + chunk, held_out=only)
        self.documents = [d for d in documents if corpus.is_held_out(d[0])] if recipe.held_out_only else documents
        self.document_ids: dict[str, list[int]] = {}
        self.sources, self.weights = zip(*recipe.mix)
        self.temps, self.temp_weights = zip(*recipe.temperatures)

    def _temperature(self) -> float:
        return self.rng.choices(self.temps, self.temp_weights)[0]

    def next(self, begin: int, accept: Callable[[str], bool]) -> _Row:
        from spectr.training import corpus, prompts

        while True:
            source = self.rng.choices(self.sources, self.weights)[0]
            if source == "magpie":
                return _Row(tokens=list(self.turn.prefix), begin=begin, phase="user", source=source,
                            temperature=self._temperature(), user_start=len(self.turn.prefix))
            if source == "instruction":
                text = next(self.instructions)
                if not accept(text):
                    continue
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True, tokenize=True, return_dict=False)
                return _Row(tokens=list(ids), begin=begin, phase="answer", source=source,
                            temperature=self._temperature(), held_out=prompts.is_held_out(text),
                            prompt_length=len(ids), prompt_text=text)
            name, text = self.documents[self.rng.randrange(len(self.documents))]
            if name not in self.document_ids:
                self.document_ids[name] = self.tokenizer(text, add_special_tokens=False).input_ids
            ids = self.document_ids[name]
            length = self.recipe.text_tokens
            if len(ids) <= length:
                continue
            start = self.rng.randrange(0, len(ids) - length)
            return _Row(tokens=ids[start : start + length], begin=begin, phase="answer", source=source,
                        temperature=self._temperature(), held_out=corpus.is_held_out(name), prompt_length=length,
                        prompt_text=f"document:{name}")


@torch.inference_mode()
def sample_chunk(lm, tokenizer, recipe: DataRecipe, chunk: int, prompt_filter, stop_ids: frozenset[int],
                 documents: list[tuple[str, str]], progress: Callable[[int], None] | None = None,
                 ) -> tuple[list[Sequence], dict, list[str]]:
    """One chunk of `recipe.chunk_steps` batched steps: the finished (and cut) sequences, counts, and the
    chat prompts the filter accepted (in order)."""
    from spectr.training import prompts
    from spectr.training.magpie import user_turn

    turn = user_turn(tokenizer) if dict(recipe.mix).get("magpie", 0) > 0 else None
    layers = recipe.layers if recipe.layers is not None else default_feature_layers(lm.config.num_layers)
    steps, batch, d = recipe.chunk_steps, recipe.rows, lm.config.hidden_size
    sources = _Sources(tokenizer, recipe, chunk, documents, turn)
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + chunk)
    accepted: list[str] = []

    def accept(text: str) -> bool:
        if prompt_filter.add(text):
            accepted.append(text)
            return True
        return False

    rows = [sources.next(0, accept) for _ in range(batch)]
    cache = lm.new_cache(steps, batch=batch)
    hidden = torch.zeros(steps, batch, d, dtype=torch.bfloat16)
    captured = torch.zeros(steps, batch, len(layers), d, dtype=torch.bfloat16)
    lse = torch.full((steps, batch), float("nan"))
    slots = torch.arange(steps)
    finished: list[Sequence] = []
    counts = {"written prompts": 0, "refused prompts": 0, "sequences": 0, "sampled tokens": 0}

    def emit(row: _Row, index: int) -> None:
        n = len(row.tokens)
        sampled = n - row.prompt_length
        if row.phase != "answer" or sampled < 1:
            return
        span = slice(row.begin, row.begin + n - 1)  # the last token was never forwarded
        finished.append(Sequence(
            tokens=torch.tensor(row.tokens), hidden=hidden[span, index].clone(), lse=lse[span, index].clone(),
            prompt_length=row.prompt_length, layers=captured[span, index].clone(), temperature=row.temperature,
            source=row.source, held_out=row.held_out, prompt=row.prompt_text))
        counts["sequences"] += 1
        counts["sampled tokens"] += sampled

    for step in range(steps):
        inputs = torch.tensor([[row.tokens[row.fed]] for row in rows])
        begins = torch.tensor([row.begin for row in rows])
        positions = (step - begins)[:, None]
        mask = ((slots[None, : step + 1] >= begins[:, None]))[:, None, :]  # [B, 1, step + 1]
        out = lm.forward(inputs, positions, cache, mask, logit_indices=_NO_ROWS, capture=layers)
        hidden[step] = out.hidden[:, 0].to(torch.bfloat16)
        captured[step] = out.layers[:, 0].to(torch.bfloat16)
        for row in rows:
            row.fed += 1
        sampling = [i for i, row in enumerate(rows) if row.fed == len(row.tokens)]
        if not sampling:
            continue
        logits = lm.logits(out.hidden[sampling, 0])  # [n, V]
        lse[step, sampling] = logits.logsumexp(-1)
        temperature = torch.tensor([1.0 if rows[i].phase == "user" else rows[i].temperature for i in sampling])
        greedy = temperature == 0
        probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], -1)
        drawn = sample_categorical(probs, generator)[:, 0]
        drawn = torch.where(greedy, logits.argmax(-1), drawn)
        for index, token in zip(sampling, drawn.tolist()):
            row = rows[index]
            row.tokens.append(token)
            if row.phase == "user":
                written = len(row.tokens) - row.user_start
                if token == turn.end or written > recipe.max_user_tokens:
                    counts["written prompts"] += 1
                    user = row.tokens[row.user_start : -1]
                    text = tokenizer.decode(user).strip()
                    special = set(user) & set(tokenizer.all_special_ids)
                    wanted = not recipe.held_out_only or prompts.is_held_out(text)
                    if token == turn.end and not special and wanted and accept(text):
                        row.tokens.extend(turn.answer_header)
                        row.phase, row.prompt_length, row.prompt_text = "answer", len(row.tokens), text
                        row.held_out = prompts.is_held_out(text)
                    else:
                        counts["refused prompts"] += 1
                        rows[index] = sources.next(step + 1, accept)
                continue
            limit = recipe.max_text_tokens if row.source == "text" else recipe.max_answer_tokens
            if token in stop_ids or len(row.tokens) - row.prompt_length >= limit:
                emit(row, index)
                rows[index] = sources.next(step + 1, accept)
        if progress is not None:
            progress(step + 1)
    for index, row in enumerate(rows):  # cut by the chunk's end: kept when long enough
        if row.phase == "answer" and len(row.tokens) - row.prompt_length >= recipe.min_kept_tokens:
            row.tokens = row.tokens[: row.fed + 1]  # tokens past the last forwarded one have no features yet
            emit(row, index)
    return finished, counts, accepted


def _save_shard(path: Path, sequences: list[Sequence]) -> None:
    """One shard: the sequences' tensors concatenated (fast to load, memory-mappable)."""
    lengths = torch.tensor([s.tokens.numel() for s in sequences])
    torch.save({
        "format": FORMAT,
        "lengths": lengths,
        "tokens": torch.cat([s.tokens for s in sequences]).to(torch.int32),
        "hidden": torch.cat([s.hidden for s in sequences]),
        "layers": torch.cat([s.layers for s in sequences]),
        "lse": torch.cat([s.lse for s in sequences]),
        "prompt_lengths": torch.tensor([s.prompt_length for s in sequences]),
        "temperatures": torch.tensor([s.temperature for s in sequences]),
        "sources": [s.source for s in sequences],
        "held_out": torch.tensor([s.held_out for s in sequences]),
        "prompts": [s.prompt for s in sequences],
    }, path)


def _load_shard(path: Path) -> list[Sequence]:
    data = torch.load(path, mmap=True, weights_only=True)
    sequences, token_at, feature_at = [], 0, 0
    for i, n in enumerate(data["lengths"].tolist()):
        features = slice(feature_at, feature_at + n - 1)
        sequences.append(Sequence(
            tokens=data["tokens"][token_at : token_at + n].long(), hidden=data["hidden"][features],
            lse=data["lse"][features], prompt_length=int(data["prompt_lengths"][i]), layers=data["layers"][features],
            temperature=float(data["temperatures"][i]), source=data["sources"][i],
            held_out=bool(data["held_out"][i]), prompt=data.get("prompts", [""] * len(data["sources"]))[i]))
        token_at, feature_at = token_at + n, feature_at + n - 1
    return sequences


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def generate_dataset(lm, tokenizer, output: Path, recipe: DataRecipe, stop_ids: frozenset[int], *,
                     max_chunks: int | None = None, deadline: float | None = None,
                     progress: Callable[[int, int], None] | None = None, log=print) -> dict:
    """Sample chunks until `recipe.tokens` sampled tokens are stored under `output` (or `max_chunks` more
    chunks, or the time.time() `deadline`, have passed); resumes after the last shard written.
    progress(chunk, step) after every step."""
    from spectr.training import corpus
    from spectr.training.magpie import PromptFilter

    output.mkdir(parents=True, exist_ok=True)
    recipe_json = json.loads(json.dumps(asdict(recipe)))
    manifest = read_manifest(output) or {"format": FORMAT, "recipe": recipe_json, "shards": []}
    # The token goal may grow between runs; anything else would make the shards a mixture. A setting the
    # stored recipe predates was its default.
    defaults = json.loads(json.dumps(asdict(DataRecipe())))
    changed = sorted(key for key in recipe_json
                     if key != "tokens" and manifest["recipe"].get(key, defaults[key]) != recipe_json[key])
    if changed:
        raise ValueError(f"{output} holds samples of another recipe (it differs in {', '.join(changed)}); "
                         "use another folder or the same settings")
    manifest["recipe"] = recipe_json
    prompt_filter = PromptFilter(recipe.duplicate_threshold)
    for shard in manifest["shards"]:  # the filter's state after those chunks, so resuming repeats them
        for text in shard["prompts"]:
            prompt_filter.add(text)
    documents = list(corpus.documents())
    done = sum(shard["sampled tokens"] for shard in manifest["shards"])
    chunks = 0
    while done < recipe.tokens and (max_chunks is None or chunks < max_chunks) and (
            deadline is None or time.time() < deadline):
        index = len(manifest["shards"])
        started = time.time()
        sequences, counts, accepted = sample_chunk(
            lm, tokenizer, recipe, index, prompt_filter, stop_ids, documents,
            progress=None if progress is None else (lambda step, i=index: progress(i, step)))
        _save_shard(output / SHARD.format(index), sequences)
        seconds = time.time() - started
        held_out = sum(s.tokens.numel() - s.prompt_length for s in sequences if s.held_out)
        manifest["shards"].append({"file": SHARD.format(index), **counts, "held-out tokens": held_out,
                                   "seconds": round(seconds, 1), "prompts": accepted})
        (output / MANIFEST).write_text(json.dumps(manifest, indent=1))
        done += counts["sampled tokens"]
        chunks += 1
        log(f"shard {index}: {counts['sequences']} sequences, {counts['sampled tokens']} sampled tokens "
            f"({held_out} held out), {recipe.rows * recipe.chunk_steps / seconds:.0f} tok/s forwarded; "
            f"{counts['refused prompts']} of {counts['written prompts']} written prompts refused")
    return manifest


def load_sequences(folder: Path, held_out: bool | None = None, limit_tokens: int | None = None) -> list[Sequence]:
    """The stored sequences of one split (None: both), in shard order, up to `limit_tokens` sampled tokens."""
    sequences, total = [], 0
    manifest = read_manifest(folder)
    files = [shard["file"] for shard in manifest["shards"]] if manifest else []
    for name in files:
        for sequence in _load_shard(Path(folder) / name):
            if held_out is None or sequence.held_out == held_out:
                sequences.append(sequence)
                total += sequence.tokens.numel() - sequence.prompt_length
                if limit_tokens is not None and total >= limit_tokens:
                    return sequences
    return sequences
