"""Text of a growing list of generated tokens, decoding only its end.

Re-decoding the whole output at every step costs time proportional to the
context. Instead, as text-generation servers do (a prefix and a read offset),
the text of tokens[:read] is settled, and each step decodes only
tokens[prefix:] — a few tokens of left context, so tokenizers whose decoding
depends on the previous token (a leading space) still agree — keeping what
lies beyond the decoded text of tokens[prefix:read]. A step whose text ends
in an unfinished UTF-8 character ('\\ufffd') settles nothing.

    text = IncrementalText(tokenizer, keep=8)
    text.extend([15, 27]); text.extend([9])
    text.pending([4])  # the text [15, 27, 9, 4] decodes to, after its first `text.length` characters
"""


class IncrementalText:
    def __init__(self, tokenizer, hidden: frozenset[int] = frozenset(), keep: int = 0):
        self.tokenizer = tokenizer
        self.hidden = hidden  # a closing stop token (EOS) is not shown
        self.keep = keep
        self.length = 0  # characters settled: the text of tokens[:read]
        self.recent = ""  # the last `keep` settled characters (a stop string may span them)
        self._tokens: list[int] = []
        self._prefix = self._read = 0
        self._prefix_text = ""  # the decoded text of tokens[prefix:read]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def pending(self, more: list[int]) -> str:
        """The text after the settled characters if `more` tokens followed the current ones."""
        window = self._tokens[self._prefix :] + more
        if window and window[-1] in self.hidden:
            window = window[:-1]
        return self._decode(window)[len(self._prefix_text) :]

    def extend(self, more: list[int]) -> None:
        new_text = self.pending(more)
        self._tokens.extend(more)
        if new_text and not new_text.endswith("\ufffd") and self._tokens[-1] not in self.hidden:
            self.length += len(new_text)
            self.recent = (self.recent + new_text)[len(self.recent) + len(new_text) - self.keep :] if self.keep else ""
            self._prefix, self._read = self._read, len(self._tokens)
            self._prefix_text = self._decode(self._tokens[self._prefix : self._read])
