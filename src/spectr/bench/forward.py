"""`spectr bench forward`: the cost of one target forward, side by side with its peers.

For each backend: the time of a forward over 1, 4, 8 and 16 new tokens on top
of `context` cached tokens (min over repeats, the backends interleaved so
machine drift hits all alike), each count's time as a multiple of the same
backend's one-token time (what a tree costs) and of llama.cpp's at the same
count; for spectr's precision modes, how far the next-token distributions move
from fp32 over the same weights; and how long spectr takes to load the model.
"""

import copy as copy_module
from dataclasses import dataclass, field
from pathlib import Path
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from spectr.bench.gguf_convert import write_bf16_gguf
from spectr.models.llama import LlamaForward
from spectr.models.gguf import GGUFModel
from spectr.models.loading import gguf_forward, load_model, load_transformers, native_forward, resolve_source
from spectr.models.reference import TransformersForward
from spectr.precisions import PRECISIONS

SAMPLE_TEXT = (
    "Speculative decoding lets a small draft model propose several tokens that a large target model "
    "then verifies in a single forward pass. When the draft agrees with the target, many tokens are "
    "emitted for the price of one target step; when it does not, a correction token is sampled so "
    "that the output distribution is exactly the target's. "
) * 8


@dataclass
class ForwardTiming:
    backend: str
    milliseconds: dict[int, float] = field(default_factory=dict)  # new tokens -> min ms
    deviation: dict[str, float] | None = None  # vs fp32: max |Δlogit|, mean / max TV, top-1 agreement
    note: str = ""


def time_once(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def deviation_from(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """How far next-token distributions over [T, V] logits move from the reference's."""
    tv = (reference.softmax(-1) - logits.softmax(-1)).abs().sum(-1) / 2  # [T]
    return {
        "max_abs_logit": float((reference - logits).abs().max()),
        "mean_tv": float(tv.mean()),
        "max_tv": float(tv.max()),
        "top1_agreement": float((reference.argmax(-1) == logits.argmax(-1)).double().mean()),
    }


def llama_cpp_runner(gguf_path: str, context_tokens: list[int], threads: int):
    """A step function over llama.cpp (llama-cpp-python), or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    # logits_all: a verification pass needs the logits of every new token, as spectr's forward gives.
    model = llama_cpp.Llama(
        model_path=gguf_path, n_ctx=1024, n_threads=threads, n_batch=64, logits_all=True, verbose=False
    )
    model.eval(context_tokens)
    cached = len(context_tokens)

    def step(new_tokens: list[int]):
        model.n_tokens = cached  # eval() drops the cache entries past n_tokens: the last step's tokens
        model.eval(new_tokens)

    return step


NEW_TOKEN_COUNTS = (1, 4, 8, 16)
LLAMA_CPP = "llama.cpp, GGUF as shipped"


def load_seconds(source: str | None) -> float:
    """spectr.models.load_model's time for this source (its cached index warm; after imports)."""
    load_model(source)  # builds the index on a first-ever run
    return time_once(lambda: load_model(source)) / 1000


def run(
    source: str | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    context: int = 200,
    new_token_counts: tuple[int, ...] = NEW_TOKEN_COUNTS,
    repeats: int = 20,
    progress: Callable[[], None] | None = None,
    compile: bool = False,
) -> list[ForwardTiming]:
    resolved = resolve_source(source)
    hf_model, tokenizer = load_transformers(resolved)
    gguf = GGUFModel(resolved.folder / resolved.gguf_file) if resolved.gguf_file else None
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids[:, :context]
    if ids.shape[1] < context:
        ids = ids.repeat(1, context // ids.shape[1] + 1)[:, :context]
    extra = ids.repeat(1, max(new_token_counts) // context + 1)[:, : max(new_token_counts)]

    steppers: dict[str, Callable[[int], None]] = {}
    results: dict[str, ForwardTiming] = {}
    reference_logits = None
    for precision in sorted(precisions, key=lambda p: p != "fp32"):  # fp32 first: the reference
        # A GGUF through spectr's own reader (native: its blocks as stored); a folder through transformers.
        lm = gguf_forward(gguf, precision) if gguf is not None else native_forward(hf_model, precision)
        cache = lm.new_cache(context + max(new_token_counts))
        logits = lm.forward(ids, torch.arange(context), cache).logits[0]
        name = f"spectr {precision}"
        results[name] = ForwardTiming(backend=name)
        if precision == "fp32":
            reference_logits = logits
        elif reference_logits is not None:
            results[name].deviation = deviation_from(reference_logits, logits)

        def step(n: int, lm: LlamaForward = lm, cache=cache) -> None:
            cache.truncate(context)
            lm.forward(extra[:, :n], torch.arange(context, context + n), cache)

        steppers[name] = step

    if compile:
        from spectr.models.compiled import CompiledForward

        compiled = CompiledForward(native_forward(hf_model, "bf16"), buckets=new_token_counts)
        compiled_cache = compiled.new_cache(context + max(new_token_counts))
        compiled.forward(ids, torch.arange(context), compiled_cache)
        for n in new_token_counts:  # compile every bucket before timing
            compiled_cache.truncate(context)
            compiled.forward(extra[:, :n], torch.arange(context, context + n), compiled_cache)
        name = "spectr bf16, torch.compile"
        results[name] = ForwardTiming(backend=name)

        def compiled_step(n: int) -> None:
            compiled_cache.truncate(context)
            compiled.forward(extra[:, :n], torch.arange(context, context + n), compiled_cache)

        steppers[name] = compiled_step

    for precision in ("fp32", "bf16"):
        name = f"transformers eager {precision}"
        copy = copy_module.deepcopy(hf_model) if precision == "bf16" else hf_model
        hf = TransformersForward(copy, precision)
        cache = hf.new_cache(context + max(new_token_counts))
        hf.forward(ids, torch.arange(context), cache)
        results[name] = ForwardTiming(backend=name)

        def hf_step(n: int, hf: TransformersForward = hf, cache=cache) -> None:
            cache.truncate(context)
            hf.forward(extra[:, :n], torch.arange(context, context + n), cache)

        steppers[name] = hf_step

    gguf_variants = {}
    if resolved.gguf_file:
        source_file = resolved.folder / resolved.gguf_file
        gguf_variants[LLAMA_CPP] = source_file
        bf16_file = Path(tempfile.mkdtemp(prefix="spectr-bench-")) / "model-bf16.gguf"
        gguf_variants["llama.cpp bf16 (same weights)"] = bf16_file
    for name, path in gguf_variants.items():
        if "bf16" in name and not path.exists():
            write_bf16_gguf(gguf_variants[LLAMA_CPP], path)
        cpp = llama_cpp_runner(str(path), ids[0].tolist(), torch.get_num_threads())
        if cpp is None:
            results[name] = ForwardTiming(backend=name, note="skipped: llama-cpp-python is not installed (extra 'peers')")
            continue
        results[name] = ForwardTiming(backend=name)
        steppers[name] = lambda n, cpp=cpp: cpp(extra[0, :n].tolist())

    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for n in new_token_counts:
            for name, step in steppers.items():  # interleaved: drift hits every backend alike
                samples.setdefault((name, n), []).append(time_once(lambda: step(n)))
        if progress is not None:
            progress()
    for (name, n), values in samples.items():
        results[name].milliseconds[n] = min(values)
        results[name].milliseconds[-n] = statistics.median(values)
    order = {f"spectr {p}": i for i, p in enumerate(precisions)}
    return sorted(results.values(), key=lambda r: order.get(r.backend, len(order)))


def render(results: list[ForwardTiming], context: int, new_token_counts: tuple[int, ...], repeats: int,
           load: float | None = None) -> str:
    by_name = {r.backend: r for r in results}
    peer = by_name.get(LLAMA_CPP)
    peer = peer if peer is not None and not peer.note else None
    header = "| backend | " + " | ".join(f"{n} tok: min ms (median)" for n in new_token_counts)
    header += " | " + " | ".join(f"{n} tok ÷ own 1 tok" for n in new_token_counts[1:])
    header += " | " + (" | ".join(f"{n} tok ÷ llama.cpp" for n in new_token_counts) + " | " if peer else "")
    header += "max abs Δlogit | mean TV | max TV | top-1 agree |"
    columns = header.count("|") - 1
    from spectr.checks import machine

    lines = [
        f"Machine: {machine().describe()}.",
        "",
        f"Forward over new tokens on top of {context} cached tokens, {torch.get_num_threads()} threads, "
        f"{repeats} interleaved repeats; deviation: next-token distributions vs spectr fp32 over the same "
        f"weights on the same {context}-token text.",
        "",
        header,
        "|---" * columns + "|",
    ]
    notes = [
        "",
        "native runs the file's own blocks as stored (Q4_1 / Q4_0 / Q8_0 with their float16 block scales) on "
        "spectr's row-invariant kernel, all layers in one kernel call (where the kernels cannot be built: torch's "
        "int4 kernel, Q8_0 as two exact int4 halves); int4 re-quantizes the dequantized weights to 32-blocks on "
        "the same kernel, int8 per channel on torch's. In decoding, verification runs the LM head only on the "
        "rows the walk reads; these timings include it for every new token. Each precision mode is exact with respect to the "
        "distribution its own verification forward computes: a lower precision changes *which* target is "
        "sampled (the deviation columns), never the exactness of speculative sampling against it. TV: "
        "total-variation distance between next-token distributions. llama.cpp runs with `logits_all` so that, "
        "like a tree verification, it produces the logits of every new token.",
    ]
    if load is not None:
        notes.append(f"\nspectr loads the model (default precision, cached index warm, after imports) in {load:.2f} s.")
    for result in results:
        ms = result.milliseconds
        if result.note:
            cells = ["—"] * (len(new_token_counts) * (3 if peer else 2) - 1)
        else:
            cells = [f"{ms[n]:.1f} ({ms[-n]:.1f})" for n in new_token_counts]
            cells += [f"{ms[n] / ms[new_token_counts[0]]:.2f}×" for n in new_token_counts[1:]]
            if peer:
                cells += [f"{ms[n] / peer.milliseconds[n]:.2f}×" for n in new_token_counts]
        d = result.deviation
        dev = (
            [f"{d['max_abs_logit']:.3f}", f"{d['mean_tv']:.4f}", f"{d['max_tv']:.4f}", f"{d['top1_agreement']:.3f}"]
            if d else (["0 (reference)", "0", "0", "1"] if result.backend == "spectr fp32" else ["", "", "", ""])
        )
        name = result.backend + (f" — {result.note}" if result.note else "")
        lines.append(f"| {name} | " + " | ".join(cells + dev) + " |")
    return "\n".join(lines + notes) + "\n"
