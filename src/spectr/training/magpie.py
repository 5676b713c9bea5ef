"""Chat prompts written by the target itself (the Magpie recipe), and a near-duplicate filter.

No chat corpus is available offline, but an instruction-tuned target has
learned what users ask: fed its chat template up to the start of a user turn,
it samples a user message. Those messages are what the draft will be asked to
continue, so the draft is trained on the target's answers to them.

A small model repeats itself, so every prompt passes `PromptFilter` before it
is answered: a few sanity checks (length, no special tokens, mostly words)
and a MinHash-LSH near-duplicate test over character 5-grams of the
normalised text, shared with the other prompt sources.
"""

from dataclasses import dataclass
import re

SENTINEL = "\x00spectr-user-message\x00"


@dataclass(frozen=True)
class UserTurn:
    """The template around one user message: `prefix` tokens open the turn, `end` is the token the
    model writes to close it, `answer_header` the forced tokens that open the assistant's reply."""

    prefix: list[int]
    end: int
    answer_header: list[int]


def user_turn(tokenizer) -> UserTurn:
    """Split the chat template around a user message (the default system prompt, if any, included)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the target's tokenizer has no chat template: prompts cannot be written by the target")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], add_generation_prompt=True,
                                             tokenize=False)
    if rendered.count(SENTINEL) != 1:
        raise ValueError("the chat template does not render a user message verbatim")
    before, after = rendered.split(SENTINEL)
    prefix = tokenizer(before, add_special_tokens=False).input_ids
    suffix = tokenizer(after, add_special_tokens=False).input_ids
    if not prefix or not suffix:
        raise ValueError("the chat template has no text before or after the user message to prompt with")
    return UserTurn(prefix=list(prefix), end=suffix[0], answer_header=list(suffix[1:]))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def shingles(text: str, width: int = 5) -> set[str]:
    text = normalise(text)
    return {text[i : i + width] for i in range(max(1, len(text) - width + 1))}


class PromptFilter:
    """Accepts a prompt once: sane and not a near-duplicate (Jaccard ≥ `threshold` of 5-gram shingles,
    estimated by MinHash LSH) of any prompt accepted before. Deterministic: the hashes are seedless."""

    def __init__(self, threshold: float = 0.7, permutations: int = 64, min_words: int = 3, max_chars: int = 800):
        from datasketch import MinHashLSH

        self.threshold, self.permutations = threshold, permutations
        self.min_words, self.max_chars = min_words, max_chars
        self.index = MinHashLSH(threshold=threshold, num_perm=permutations)
        self.count = 0
        self.rejected = {"short": 0, "long": 0, "not words": 0, "duplicate": 0}

    def _minhash(self, text: str):
        from datasketch import MinHash

        signature = MinHash(num_perm=self.permutations)
        signature.update_batch([s.encode() for s in sorted(shingles(text))])
        return signature

    def check(self, text: str) -> str | None:
        """Why `text` is refused, or None if it is new and sane."""
        words = text.split()
        if len(words) < self.min_words:
            return "short"
        if len(text) > self.max_chars:
            return "long"
        if sum(ch.isalpha() or ch.isspace() for ch in text) < 0.6 * len(text):
            return "not words"
        if self.index.query(self._minhash(text)):
            return "duplicate"
        return None

    def add(self, text: str) -> bool:
        """Accept `text` if it passes; record why not otherwise."""
        reason = self.check(text)
        if reason is not None:
            self.rejected[reason] += 1
            return False
        self.index.insert(str(self.count), self._minhash(text))
        self.count += 1
        return True
