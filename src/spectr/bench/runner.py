"""`spectr bench`: spectr's decoding methods and the peers, side by side, prompt by prompt.

Every method decodes the same prompt ids for the same number of new tokens
(end-of-sequence does not stop anyone, so all do equal work), at the same
temperature, with top-k and top-p off everywhere (transformers' `generate`
would otherwise apply top_k = 50). Methods are interleaved prompt by prompt,
in an order that rotates from prompt to prompt, so drift of this shared
machine hits every method alike. Timings include the prompt's prefill for
every method; tokenisation is outside.

Peers: transformers' `generate` (same weights, same dtype), its prompt-lookup
assisted generation (the same kind of draft as spectr's n-gram drafter), its
assisted generation with a draft model (only when the bench's draft is a
model transformers can load), and llama.cpp on the same GGUF file (and a bf16
copy of it). A peer that cannot run here is recorded as skipped with the
reason, never dropped.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
import copy
import importlib.util
import platform
import time
from pathlib import Path

import torch

from spectr.bench.suites import Prompt, load_suite
from spectr.checks import machine
from spectr.decoding import Decoder, DecodeSettings
from spectr.drafters.base import capture_kwargs, root_distributions, target_features
from spectr.processing import SamplingParams


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "spectr", "hf" or "llama.cpp"
    kind: str = "ar"  # spectr: ar | sd | spectr; hf: generate | prompt-lookup | assisted; llama.cpp: q | bf16
    rule: str | None = None
    k: int = 1
    length: int = 1
    draft: str = ""  # spectr: "" for the bench's draft, else the label of a draft compared alongside
    tree: str = "iid"  # spectr: how the draft tree is built (decoding.TREES)
    budget: int | None = None  # spectr: nodes of a dynamic tree


@dataclass
class Record:
    method: str
    suite: str
    prompt: str
    temperature: float
    prompt_tokens: int
    new_tokens: int
    seconds: float  # decoding: from the end of the prompt's pass (prompt eval) to the last token
    target_passes: int
    accepted_per_position: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    select_seconds: float = 0.0
    prefill_seconds: float = 0.0  # the prompt's pass, apart from `seconds` (a long prompt would drown decoding)


@dataclass
class BenchConfig:
    suites: tuple[str, ...] = ("code", "summarize", "chat")
    prompts_per_suite: int = 4
    temperatures: tuple[float, ...] = (0.0, 0.7, 1.0)
    max_new_tokens: int = 128
    grid_k: tuple[int, ...] = (1, 2, 4, 8)
    grid_length: tuple[int, ...] = (2, 4, 6)
    rules_at: tuple[int, int] = (4, 4)  # (k, L) where the other rules are compared with K-SEQ
    dynamic_at: tuple[tuple[int, int, int], ...] = ((2, 2, 3), (2, 4, 6), (4, 4, 12))  # (k, L, nodes) of dynamic trees
    greedy_at: tuple[tuple[int, int], ...] = ((2, 2), (3, 2), (4, 3))  # (k, L) of greedy trees
    peers: bool = True
    seed: int = 0
    compared_drafts: tuple[str, ...] = ()  # labels of other drafts run through the same grid (`run_bench`)
    approximate: tuple[str, ...] = ()  # approximate modes ('sparq:8,64') run as a plain loop, their deviation measured
    extras: bool = True  # also the other rules (rules_at) and the dynamic and greedy trees, at their fixed shapes


def spectr_methods(config: BenchConfig) -> list[Method]:
    from spectr.planner import MAX_AUTO_LENGTH

    methods = [Method("spectr ar", "spectr", "ar")]
    for draft in ("", *config.compared_drafts):
        tag = f" [{draft}]" if draft else ""
        methods.append(Method(f"spectr auto{tag}", "spectr", "spectr", None, 1, MAX_AUTO_LENGTH, draft, "auto"))
    for length in config.grid_length:
        for draft in ("", *config.compared_drafts):
            tag = f" [{draft}]" if draft else ""
            methods.append(Method(f"spectr sd L={length}{tag}", "spectr", "sd", "standard", 1, length, draft))
            methods.append(Method(f"spectr block L={length}{tag}", "spectr", "sd", "block", 1, length, draft))
            for k in config.grid_k:
                if k > 1:
                    for rule in ("kseq", "importance"):  # the two-step rule on K-SEQ's very trees
                        methods.append(Method(f"spectr {rule} k={k} L={length}{tag}", "spectr", "spectr", rule, k,
                                              length, draft))
    k, length = config.rules_at
    for rule in ("specinfer", "rsd") if config.extras else ():
        methods.append(Method(f"spectr {rule} k={k} L={length}", "spectr", "spectr", rule, k, length))
    for k, length, nodes in config.dynamic_at if config.extras else ():
        methods.append(Method(f"spectr dynamic k={k} L={length} n={nodes}", "spectr", "spectr", None, k, length,
                              tree="dynamic", budget=nodes))
    for k, length in config.greedy_at if config.extras else ():
        methods.append(Method(f"spectr greedy k={k} L={length}", "spectr", "spectr", None, k, length, tree="greedy"))
    for spec in config.approximate:
        methods.append(Method(f"spectr ar [{approximate_label(spec)}]", "spectr", "ar", draft=approximate_label(spec)))
    return methods


def approximate_label(spec: str) -> str:
    """How an approximate mode is named in results: never mistaken for an exact method."""
    return f"APPROXIMATE {spec}"


def peer_methods(config: BenchConfig) -> list[Method]:
    length = max(config.grid_length)
    return [
        Method("hf generate", "hf", "generate"),
        Method(f"hf prompt-lookup L={length}", "hf", "prompt-lookup", length=length),
        Method(f"hf assisted L={length}", "hf", "assisted", length=length),
        Method("llama.cpp (same GGUF)", "llama.cpp", "q"),
        Method("llama.cpp bf16", "llama.cpp", "bf16"),
    ]


class Peers:
    """The peer implementations, loaded on first use; `unavailable` says why one cannot run."""

    def __init__(self, engine, cache_dir: Path):
        self.engine = engine
        self.cache_dir = cache_dir
        self._hf = None
        self._assistant = None
        self._llama: dict[str, object] = {}
        self.passes = 0

    def unavailable(self, method: Method) -> str | None:
        source = self.engine.target.source
        if method.family == "hf" and method.kind == "assisted" and self._assistant_model() is None:
            return ("the draft is not a model transformers can load (an EAGLE-style head or a trained layer stack "
                    "reads spectr's own format; n-gram drafts are compared through prompt lookup)")
        if method.family == "llama.cpp":
            if importlib.util.find_spec("llama_cpp") is None:
                return "llama-cpp-python is not installed (pip install -e '.[peers]'; compiles llama.cpp, ~17 min)"
            if source.gguf_file is None:
                return "the target is not a GGUF file"
        return None

    def hf(self):
        if self._hf is None:
            self._hf = copy.deepcopy(self.engine.target.hf_model).to(self.engine.target.lm.dtype).eval()
            self._hf.generation_config.eos_token_id = None  # equal work: nobody stops early

            def count(module, args, output):
                self.passes += 1
                if self.passes == 1:
                    self.first_pass_end = time.perf_counter()  # the prompt's pass (and the first token's logits)

            self._hf.register_forward_hook(count)
        return self._hf

    def _assistant_model(self):
        if self._assistant is None:
            draft = self.engine.draft
            # A trained draft (no transformers config) reads spectr's own format: transformers cannot load it.
            hf_model = draft.hf_model if draft is not None and draft.hf_config is not None else None
            self._assistant = False if hf_model is None else copy.deepcopy(hf_model).to(self.engine.target.lm.dtype)
            if self._assistant:
                self._assistant.generation_config.eos_token_id = None
        return self._assistant or None

    def llama(self, kind: str):
        if kind not in self._llama:
            from llama_cpp import Llama

            path = self.engine.target.source.folder / self.engine.target.source.gguf_file
            if kind == "bf16":
                from spectr.bench.gguf_convert import write_bf16_gguf

                converted = self.cache_dir / (path.stem + ".bf16.gguf")
                if not converted.exists():
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    write_bf16_gguf(path, converted)
                path = converted
            self._llama[kind] = Llama(model_path=str(path), n_ctx=self.engine.target.lm.config.context_length,
                                      n_threads=torch.get_num_threads(), verbose=False)
        return self._llama[kind]

    def run(self, method: Method, ids: list[int], temperature: float, max_new_tokens: int, seed: int) -> Record:
        record = Record(method.name, "", "", temperature, len(ids), 0, 0.0, 0)
        if method.family == "hf":
            model = self.hf()
            options = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=0)
            if temperature > 0:  # generate's defaults would apply top_k = 50
                options.update(temperature=temperature, top_k=0, top_p=1.0)
            extra = {}
            if method.kind == "prompt-lookup":
                options["prompt_lookup_num_tokens"] = method.length
            elif method.kind == "assisted":
                options["num_assistant_tokens"] = method.length
                options["num_assistant_tokens_schedule"] = "constant"
                extra["assistant_model"] = self._assistant_model()
            torch.manual_seed(seed)
            inputs = torch.tensor([ids])
            self.passes = 0
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(inputs, attention_mask=torch.ones_like(inputs), **options, **extra)
            record.prefill_seconds = self.first_pass_end - start
            record.seconds = time.perf_counter() - self.first_pass_end
            record.new_tokens = out.shape[1] - len(ids)
            record.target_passes = self.passes
        else:
            llm = self.llama(method.kind)
            llm.reset()
            llm.set_seed(seed)
            start = first = time.perf_counter()
            for count, _ in enumerate(llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, temp=temperature,
                                                   repeat_penalty=1.0, reset=True), start=1):
                if count == 1:  # the prompt's pass and the first token: as hf's first pass
                    first = time.perf_counter()
                if count == max_new_tokens:
                    break
            record.prefill_seconds = first - start
            record.seconds = time.perf_counter() - first
            record.new_tokens = record.target_passes = max_new_tokens
        return record


def run_spectr(engine, method: Method, ids: list[int], temperature: float, max_new_tokens: int, seed: int) -> Record:
    from spectr.api import GenerationStats

    settings = DecodeSettings(method=method.kind, rule=method.rule, k=method.k, length=method.length,
                              tree=method.tree, budget=method.budget)
    drafter = engine.drafter() if method.kind != "ar" else None
    profile = engine.cost_profile(settings.length) if settings.tree == "auto" else None
    decoder = Decoder(engine.target_forward(), drafter, settings, SamplingParams(temperature=temperature), profile)
    stats = GenerationStats()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in decoder.stream(ids, max_new_tokens, generator):  # no stop tokens: equal work for all
        stats.add(step)
    seconds = time.perf_counter() - start
    return Record(method.name, "", "", temperature, len(ids), stats.new_tokens, seconds - decoder.prefill_seconds,
                  stats.steps, stats.accepted_per_position, stats.draft_seconds, stats.verify_seconds,
                  stats.select_seconds, decoder.prefill_seconds)


def encode(engine, prompt: Prompt) -> list[int]:
    from spectr.api import encode_prompt

    return encode_prompt(engine, prompt.text, chat=prompt.chat)


def run_bench(engine, config: BenchConfig, cache_dir: Path, methods: list[Method] | None = None,
              progress: Callable[[int, int, str], None] | None = None, compared: dict | None = None) -> dict:
    """Run every method on every prompt of every suite at every temperature; the raw results as a dict.
    compared: label -> Engine (same target, another draft) for config.compared_drafts, and for each approximate
    mode (approximate_label(spec) -> an Engine with it)."""
    engines = {"": engine, **(compared or {})}
    missing = [label for label in config.compared_drafts + tuple(approximate_label(a) for a in config.approximate)
               if label not in engines]
    if missing:
        raise ValueError(f"no engine given for the compared drafts or approximate modes {missing}")
    methods = methods if methods is not None else spectr_methods(config) + (peer_methods(config) if config.peers else [])
    peers = Peers(engine, cache_dir)
    skipped = []
    runnable = []
    for method in methods:
        reason = None if method.family == "spectr" else peers.unavailable(method)
        if reason is None:
            runnable.append(method)
        else:
            skipped.append({"method": method.name, "reason": reason})
    prompts = [prompt for suite in config.suites for prompt in load_suite(suite, config.prompts_per_suite)]
    total = len(prompts) * len(config.temperatures) * len(runnable)
    done = 0
    records = []
    for temperature in config.temperatures:
        for index, prompt in enumerate(prompts):
            ids = encode(engine, prompt)
            shift = index % len(runnable)
            for method in runnable[shift:] + runnable[:shift]:  # rotate the order, prompt by prompt
                seed = config.seed + index
                if method.family == "spectr":
                    record = run_spectr(engines[method.draft], method, ids, temperature, config.max_new_tokens,
                                        seed)
                else:
                    record = peers.run(method, ids, temperature, config.max_new_tokens, seed)
                record.suite, record.prompt = prompt.suite, prompt.name
                records.append(record)
                done += 1
                if progress is not None:
                    progress(done, total, f"T={temperature:g} {prompt.suite} {method.name}")
    return {
        "config": {**asdict(config), "methods": [asdict(m) for m in runnable]},
        "machine": {"platform": platform.platform(), "processor": machine().describe(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "engine": engine.describe(paths=False),
        "compared_drafts": {label: e.describe(paths=False) for label, e in (compared or {}).items()},
        "approximate": {approximate_label(spec): approximation_deviation(engine, engines[approximate_label(spec)],
                                                                         prompts, seed=config.seed)
                        for spec in config.approximate},
        "skipped": skipped,
        "records": [asdict(r) for r in records],
        "summary": summarize(records, runnable),
    }


def summarize(records: list[Record], methods: list[Method]) -> list[dict]:
    """Per method, suite (and 'all') and temperature: throughput, ratios, block efficiency, acceptance, split."""
    rows = []
    groups: dict[tuple[str, str, float], list[Record]] = {}
    for record in records:
        for suite in (record.suite, "all"):
            groups.setdefault((record.method, suite, record.temperature), []).append(record)
    speed = {key: sum(r.new_tokens for r in group) / max(sum(r.seconds for r in group), 1e-12)
             for key, group in groups.items()}
    by_name = {m.name: m for m in methods}
    for (name, suite, temperature), group in groups.items():
        tokens = sum(r.new_tokens for r in group)
        seconds = sum(r.seconds for r in group)
        passes = sum(r.target_passes for r in group)
        depth = max((len(r.accepted_per_position) for r in group), default=0)
        accepted = [sum(r.accepted_per_position[i] for r in group if i < len(r.accepted_per_position)) / passes
                    for i in range(depth)]
        method = by_name[name]
        ar = speed.get(("spectr ar", suite, temperature))
        hf = speed.get(("hf generate", suite, temperature))
        split = {part: sum(getattr(r, f"{part}_seconds") for r in group) / seconds
                 for part in ("draft", "verify", "select")} if method.family == "spectr" else {}
        if split:
            split["other"] = max(0.0, 1 - sum(split.values()))
        rows.append({
            "method": name, "family": method.family, "kind": method.kind, "rule": method.rule, "draft": method.draft,
            "k": method.k, "tree": method.tree, "budget": method.budget,
            "L": method.length, "suite": suite, "temperature": temperature, "new_tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds,
            "speedup_vs_ar": speed[(name, suite, temperature)] / ar if ar else None,
            "speedup_vs_hf": speed[(name, suite, temperature)] / hf if hf else None,
            "block_efficiency": tokens / passes if passes else None,
            "acceptance_per_position": accepted, "time_split": split,
        })
    return rows


COUPLED_RULES = ("kseq", "specinfer", "importance")  # rules with a closed-form acceptance from (p, q, k)


def rules_vs_optimal(engine, prompts: list[Prompt], temperatures: tuple[float, ...], ks=(1, 2, 4, 8),
                     tokens: int = 48, seed: int = 0, rules: tuple[str, ...] = COUPLED_RULES) -> dict:
    """First-token acceptance of each rule, exact from (p, q) at real positions, and α*.

    Positions: the target's own samples (T = 1) after each prompt; q is the drafter's distribution at
    the root of a tree there, p the target's, both at temperature T.
    """
    from spectr.rules import RULES, optimal_acceptance

    result: dict = {}
    pairs: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {t: [] for t in temperatures if t > 0}
    lm = engine.target.lm
    for index, prompt in enumerate(prompts):
        ids = encode(engine, prompt)
        sample = ids + sample_continuation(engine, ids, tokens, seed + index)
        drafter = engine.drafter()
        out = lm.forward(torch.tensor([sample]), torch.arange(len(sample)), lm.new_cache(len(sample)),
                         **capture_kwargs(drafter))
        for temperature in pairs:
            params = SamplingParams(temperature=temperature)
            for position, q in root_distributions(drafter, sample, len(ids) - 1, target_features(drafter, out),
                                                  params):
                if q is None:
                    return {}  # a deterministic draft: nothing to couple
                p = torch.softmax(out.logits[0, position].double() / temperature, -1)
                q = q.double()
                pairs[temperature].append((p, q / q.sum()))  # float64 throughout: bounds compare exactly
    for temperature, items in pairs.items():
        curves: dict[str, dict[int, float]] = {"α*": {}, **{rule: {} for rule in rules}}
        for k in ks:
            curves["α*"][k] = sum(optimal_acceptance(p, q, k) for p, q in items) / len(items)
            for rule in rules:
                curves[rule][k] = sum(RULES[rule].acceptance_probability(p, q, k)
                                      for p, q in items) / len(items)
        result[f"{temperature:g}"] = curves
    return result


def sample_continuation(engine, ids: list[int], tokens: int, seed: int, temperature: float = 1.0) -> list[int]:
    """The target's own continuation of `ids` (plain sampling), as token ids."""
    decoder = Decoder(engine.target.lm, None, DecodeSettings(method="ar"), SamplingParams(temperature=temperature))
    return [t for step in decoder.stream(ids, tokens, torch.Generator().manual_seed(seed)) for t in step.emitted]


def approximation_deviation(engine, approximate, prompts: list[Prompt], tokens: int = 32, seed: int = 0) -> dict:
    """How far an approximate mode's next-token law is from the target's exact one: the mean total variation
    (at T = 1, over the whole vocabulary) at each of `tokens` positions along the target's own continuation of
    each prompt, per suite and over all ("all"), both laws computed over the same exact cache."""
    lm, approximated = engine.target.lm, approximate.target_forward()
    totals: dict[str, list[float]] = {}
    for index, prompt in enumerate(prompts):
        ids = encode(engine, prompt)
        text = ids + sample_continuation(engine, ids, tokens, seed + index)
        cache = lm.new_cache(len(text))
        lm.forward(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1), cache, logit_indices=torch.tensor([], dtype=torch.long))
        for position in range(len(ids) - 1, len(text) - 1):
            token, at = torch.tensor([[text[position]]]), torch.tensor([position])
            rough = approximated.forward(token, at, cache).logits[0, -1].double().softmax(-1)
            cache.truncate(position)  # its keys and values went through approximate layers: the exact pass rewrites them
            exact = lm.forward(token, at, cache).logits[0, -1].double().softmax(-1)
            for key in (prompt.suite, "all"):
                totals.setdefault(key, []).append(float((rough - exact).abs().sum() / 2))
    return {key: {"mean_tv": sum(values) / len(values), "max_tv": max(values), "positions": len(values)}
            for key, values in totals.items()}
