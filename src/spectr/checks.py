"""`spectr check`: what this machine runs, and whether each precision keeps verification bitwise stable.

Greedy speculative decoding equals greedy decoding, and a sampled step uses
exactly the logits a one-token step would, only where a position's logits are
the same bits inside a verification tree as alone (batch invariance). spectr's
kernels hold it by construction; dense torch matmuls and the no-compiler
fallback generally do not. This module measures it on the real model instead
of asserting it.
"""

from dataclasses import dataclass
import platform
import subprocess

import torch

from spectr.models import kernels
from spectr.tree import tree_attention_mask, tree_positions

# The CPU features spectr's kernels (and torch's) can use, by /proc/cpuinfo flag name.
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")
PROBE_PROMPT = "The three longest rivers in Europe are"
# A tree of 8 nodes under the root: two branches of four.
PROBE_PARENTS = torch.tensor([-1, 0, 1, 2, -1, 4, 5, 6])


@dataclass(frozen=True)
class Machine:
    cpu: str
    simd: tuple[str, ...]  # the SIMD_FLAGS this CPU has
    threads: int  # torch's intra-op threads (spectr's kernels use the same OpenMP pool size)
    compiler: str | None  # first line of `c++ --version`, None where none is found
    kernels: bool  # spectr's kernels are built and loaded
    kernels_disabled: bool  # SPECTR_KERNELS=off
    kernel_path: str | None = None  # the block kernel's path: "avx512-vnni", "avx2" or "portable"

    def describe(self) -> str:
        """One line: the CPU, its SIMD features, and whether spectr's kernels run."""
        if self.kernels:
            state = f"spectr kernels built, {self.kernel_path} path"
        elif self.kernels_disabled:
            state = "spectr kernels off (SPECTR_KERNELS=off): torch's kernels, not row-invariant"
        else:
            state = f"spectr kernels not built ({self.compiler or 'no C++ compiler found'}): torch's kernels, not row-invariant"
        return f"{self.cpu} ({', '.join(self.simd) or 'no SIMD spectr uses'}; {state})"


def machine() -> Machine:
    flags: set[str] = set()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        version = (kernels.compiler_version() or "").splitlines()
    except (OSError, subprocess.SubprocessError):
        version = []
    return Machine(cpu=cpu, simd=tuple(f for f in SIMD_FLAGS if f in flags), threads=torch.get_num_threads(),
                   compiler=version[0] if version else None, kernels=kernels.available(),
                   kernels_disabled=kernels.disabled(), kernel_path=kernels.path())


def tree_invariance(lm, prompt: list[int], parents: torch.Tensor = PROBE_PARENTS) -> float:
    """Largest |difference| between a tree pass's logits and the same positions run one token at a
    time along their paths (0.0: bitwise equal). The tree's tokens are the prompt's, recycled."""
    cached = len(prompt) - 1  # the last prompt token is the tree's root
    ids = torch.tensor(prompt)[None]
    nodes = torch.tensor([prompt[i % len(prompt)] for i in range(len(parents))])[None]
    tokens = torch.cat([ids[:, -1:], nodes], 1)
    cache = lm.new_cache(cached + len(parents) + 1)
    lm.forward(ids[:, :cached], torch.arange(cached), cache, logit_indices=torch.tensor([], dtype=torch.long))
    mask = tree_attention_mask(parents, cached)
    tree = lm.forward(tokens, tree_positions(parents, cached), cache, mask).logits[0]  # [root + nodes, V]
    worst = 0.0
    for row in range(tokens.shape[1]):
        path = [j for j in range(tokens.shape[1]) if mask[row, cached + j]]  # the root, ancestors, itself
        cache.truncate(cached)
        for depth, j in enumerate(path):
            alone = lm.forward(tokens[:, j : j + 1], torch.tensor([cached + depth]), cache).logits[0, 0]
        worst = max(worst, float((alone - tree[row]).abs().max()))
    return worst


@dataclass(frozen=True)
class PrecisionCheck:
    precision: str
    backend: str
    fused: bool  # whole layers run as one kernel call
    difference: float  # tree_invariance: 0.0 when invariant

    @property
    def invariant(self) -> bool:
        return self.difference == 0.0


def check_precisions(source=None, precisions: tuple[str, ...] | None = None) -> list[PrecisionCheck]:
    """Load the model at each precision (default: all) and measure its tree-vs-one-token invariance."""
    from spectr.models.loading import load_model
    from spectr.precisions import PRECISIONS

    results = []
    for precision in precisions or PRECISIONS:
        model = load_model(source, precision=precision)
        prompt = model.tokenizer(PROBE_PROMPT).input_ids
        results.append(PrecisionCheck(precision=precision, backend=model.lm.backend,
                                      fused=bool(getattr(model.lm, "fused", False)),
                                      difference=tree_invariance(model.lm, prompt)))
    return results
