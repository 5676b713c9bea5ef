"""Request bodies of the OpenAI API, plus spectr's own fields (k, L, tree, budget, method, rule, top_k)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from spectr.decoding import METHODS, TREES
from spectr.rules import RULES


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # spectr's own
    k: int | None = Field(default=None, ge=1)  # None (with L and tree): tree 'auto' (api.decode_settings)
    L: int | None = Field(default=None, ge=1)
    method: Literal[METHODS] = "spectr"
    rule: Literal[tuple(RULES)] | None = None
    tree: Literal[TREES] | None = None
    budget: int | None = Field(default=None, ge=1)

    def stops(self) -> list[str]:
        return [] if self.stop is None else ([self.stop] if isinstance(self.stop, str) else list(self.stop))


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
