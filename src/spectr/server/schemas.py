"""Request bodies of the OpenAI API, plus spectr's own fields (k, L, tree, budget, method, rule, top_k,
repetition_penalty).

Every field is either honoured or refused: a body with a field not declared here is a 400 that names it
(`UNSUPPORTED` says why for the OpenAI fields spectr does not implement), never silently ignored. The
README's field table lists the same.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spectr.decoding import METHODS, TREES
from spectr.rules import RULES
from spectr.settings import MAX_LOGPROBS

# OpenAI request fields that spectr does not implement, and why (the 400's message).
UNSUPPORTED = {
    "tools": "tool calling is not supported (no constrained decoding that keeps the output law exact yet)",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "echo": "echoing the prompt is not supported",
    "suffix": "insertion (suffix) is not supported",
    "best_of": "best_of is not supported (use n)",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported (spectr drafts its own)",
    "reasoning_effort": "this model has no reasoning setting",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported",
    "metadata": "stored completions are not supported (metadata)",
    "service_tier": "service tiers are not supported",
    "min_p": "min_p is not supported (use top_p or top_k)",
    "response_format": "only {'type': 'text'}: JSON output needs constrained decoding, which spectr does not do",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    logit_bias: dict[int, float] | None = None  # token id (a string key in JSON) -> bias in [-100, 100]
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id: it goes into the server's log line of the request, nowhere else
    # spectr's own
    k: int | None = Field(default=None, ge=1)  # None (with L and tree): tree 'auto' (settings.decode_settings)
    L: int | None = Field(default=None, ge=1)
    method: Literal[METHODS] = "spectr"
    rule: Literal[tuple(RULES)] | None = None
    tree: Literal[TREES] | None = None
    budget: int | None = Field(default=None, ge=1)

    def stops(self) -> list[str]:
        return [] if self.stop is None else ([self.stop] if isinstance(self.stop, str) else list(self.stop))

    def logprobs_count(self) -> int | None:
        """How many top tokens to report per emitted token; None: no logprobs."""
        raise NotImplementedError


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # top tokens per token (legacy form)
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]  # json_object / json_schema need constrained decoding: refused, named


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict]:
        """The messages as the chat template takes them ('developer' is the newer name of 'system')."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
