"""Response bodies of the OpenAI API: completions and chat completions, whole or as stream chunks, with
logprobs in each endpoint's own form and spectr's speculative statistics as an extension of `usage`."""

from spectr import api
from spectr.processing import TokenLogprob


CONTEXT_TOKENS = 4  # tokens of left context a token's text is decoded after (a leading space depends on it)


class TokenStrings:
    """A token's text as logprobs show it: what it adds to the text after the tokens before it, so that a
    choice's token texts join into its text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def after(self, before: list[int], token: int) -> str:
        context = before[-CONTEXT_TOKENS:]
        return self._decode(context + [token])[len(self._decode(context)):]


def usage(stats: list[api.GenerationStats]) -> dict:
    """Usage of a request (its choices summed), with spectr's statistics of the speculation."""
    new_tokens = sum(s.new_tokens for s in stats)
    steps = sum(s.steps for s in stats)
    accepted: list[int] = []
    shapes: dict[str, int] = {}
    for s in stats:
        for position, count in enumerate(s.accepted_per_position):
            accepted.extend([0] * (position + 1 - len(accepted)))
            accepted[position] += count
        for shape, count in s.shapes.items():
            shapes[shape] = shapes.get(shape, 0) + count
    return {
        "prompt_tokens": stats[0].prompt_tokens,
        "completion_tokens": new_tokens,
        "total_tokens": stats[0].prompt_tokens + new_tokens,
        "spectr": {
            "block_efficiency": round(new_tokens / steps, 4) if steps else 0.0,
            "steps_by_shape": shapes,
            "target_passes": steps,
            "accepted_per_position": accepted,
        },
    }


def chat_logprobs(entries: list[TokenLogprob], strings: TokenStrings, before: list[int]) -> dict:
    """The chat form of the logprobs of `entries`, emitted after the tokens `before` (extended with them)."""
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for e in entries:
        top = [item(strings.after(before, t), lp) for t, lp in e.top]
        content.append({**item(strings.after(before, e.token), e.logprob), "top_logprobs": top})
        before.append(e.token)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], strings: TokenStrings, before: list[int], offset: int) -> dict:
    """The legacy form, emitted after the tokens `before` (extended with them); text_offset counts from the
    start of the completion, `offset` characters in."""
    tokens, offsets, tops = [], [], []
    for e in entries:
        tops.append({strings.after(before, t): lp for t, lp in e.top})
        tokens.append(strings.after(before, e.token))
        offsets.append(offset)
        offset += len(tokens[-1])
        before.append(e.token)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def completion_body(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None,
                    stream: bool) -> dict:
    """choices: {index, text, finish_reason, logprobs}."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "text": c["text"] or "", "finish_reason": c["finish_reason"],
                         "logprobs": c["logprobs"]} for c in choices]}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_body(request_id: str, created: int, model: str, choices: list[dict], usage_: dict | None,
              stream: bool) -> dict:
    """choices: {index, text (None: the opening chunk of a stream), finish_reason, logprobs}."""
    shaped = []
    for c in choices:
        if stream:
            delta = {"role": "assistant", "content": ""} if c["text"] is None else {"content": c["text"]}
            shaped.append({"index": c["index"], "delta": delta, "finish_reason": c["finish_reason"],
                           "logprobs": c["logprobs"]})
        else:
            shaped.append({"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                           "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]})
    body = {"id": request_id, "object": "chat.completion.chunk" if stream else "chat.completion",
            "created": created, "model": model, "choices": shaped}
    if usage_ is not None:
        body["usage"] = usage_
    return body
