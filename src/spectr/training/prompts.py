"""Instructions for self-distillation, built offline: templates over subjects.

The draft must learn how the target answers chat requests, so training text is
the target's own answers to instructions. No instruction dataset is available
offline, so instructions are made from templates (explain, list, write,
compare, code, summarise, ...) over subjects taken from everyday topics, the
Python documentation's topics and the standard library's modules and
functions. Deterministic for a seed; every instruction is assigned to the
training or held-out split by a hash of its text, and the hand-written chat
prompts the studies and benchmarks measure on are never produced here.
"""

from collections.abc import Iterator
import hashlib
import inspect
import random

HELD_OUT_PERCENT = 5

EVERYDAY_SUBJECTS = """
photosynthesis; the water cycle; black holes; volcanoes; earthquakes; the immune system; vaccines; sleep;
coffee; tea; bread baking; composting; recycling; climate change; solar power; wind turbines; electric cars;
the internet; email etiquette; job interviews; public speaking; time management; budgeting; saving money;
learning a language; learning to swim; running a marathon; yoga; meditation; healthy breakfast; chess;
the Roman Empire; the Renaissance; the printing press; the industrial revolution; the moon landing;
ancient Egypt; the Silk Road; democracy; inflation; supply and demand; interest rates; startups;
friendship; moving to a new city; remote work; houseplants; dogs; cats; birds migration; honeybees;
the ocean; coral reefs; rainforests; deserts; mountains; rivers; the solar system; Mars; the Sun;
gravity; electricity; magnets; light; sound; music theory; the guitar; the piano; painting; photography;
poetry; novels; fairy tales; movies; video games; board games; football; basketball; tennis; cycling;
cooking pasta; making soup; a birthday party; a wedding speech; a thank-you note; a cover letter;
a product review; a travel plan for Paris; a weekend in Tokyo; camping; hiking safety; first aid;
the common cold; drinking water; nutrition; vitamins; exercise; stress; motivation; habits; creativity;
artificial intelligence; machine learning; neural networks; robots; smartphones; passwords; privacy;
databases; spreadsheets; operating systems; open source software; version control; cloud computing;
encryption; prime numbers; fractions; probability; statistics; geometry; algebra; calculus; logic puzzles;
the history of writing; libraries; museums; architecture; bridges; trains; airplanes; ships; maps;
weather forecasts; snow; rain; thunderstorms; rainbows; seasons; gardening; tomatoes; apples; chocolate;
kindness; honesty; teamwork; leadership; negotiation; conflict at work; giving feedback; writing emails;
a science fair project; a school essay; a book club; a podcast; a small business; a bakery; a bookstore
"""

TEMPLATES = [
    "Explain {s} in simple terms.",
    "Explain {s} to a ten-year-old.",
    "What is {s}?",
    "Give me three interesting facts about {s}.",
    "Write a short paragraph about {s}.",
    "Write a short poem about {s}.",
    "Write a haiku about {s}.",
    "Write a short story that involves {s}.",
    "List five tips related to {s}.",
    "What are the pros and cons of {s}?",
    "Summarize what people should know about {s} in four sentences.",
    "Why is {s} important?",
    "Describe {s} as if you were a tour guide.",
    "Give me a step-by-step guide about {s}.",
    "Write a tweet about {s}.",
    "Write a short email to a friend about {s}.",
    "What are common misconceptions about {s}?",
    "Compare {s} and {t}.",
    "How are {s} and {t} related?",
    "Write a dialogue between two people discussing {s}.",
    "Create a quiz with three questions about {s}.",
    "Suggest a title for a blog post about {s} and outline it.",
    "I am a beginner. How do I get started with {s}?",
    "Tell me a joke about {s}.",
]

CODE_TEMPLATES = [
    "Write a Python function that {d}",
    "Explain what this Python function does: {n}. {d}",
    "How do I use {n} in Python? Show an example.",
    "What does the Python module {m} do?",
    "Show a short example of the {m} module in Python.",
    "Write a Python script that uses {m}.",
    "What are common mistakes when using {n} in Python?",
    "Explain the Python concept '{topic}'.",
]

MODULES = [
    "os", "sys", "json", "re", "math", "random", "datetime", "collections", "itertools", "functools",
    "pathlib", "subprocess", "argparse", "logging", "csv", "sqlite3", "statistics", "string", "textwrap",
    "heapq", "bisect", "dataclasses", "typing", "enum", "shutil", "glob", "time", "calendar", "decimal",
    "fractions", "hashlib", "base64", "urllib.parse", "http.client", "socket", "threading", "asyncio",
    "unittest", "doctest", "pickle", "copy", "pprint", "operator", "contextlib", "tempfile", "zipfile",
    "gzip", "struct", "array", "difflib", "secrets", "uuid", "io", "inspect", "abc", "weakref",
]


def _everyday() -> list[str]:
    return [s.strip() for s in EVERYDAY_SUBJECTS.replace("\n", " ").split(";") if s.strip()]


def _functions() -> list[tuple[str, str]]:
    """(qualified name, first docstring sentence) for public functions of the listed modules."""
    import importlib

    found = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or not callable(value):
                continue
            doc = inspect.getdoc(value) or ""
            first = doc.split("\n\n")[0].replace("\n", " ").strip()
            if 20 <= len(first) <= 200 and not first.startswith(name + "("):
                found.append((f"{module_name}.{name}", first[0].lower() + first[1:]))
    return found


def is_held_out(instruction: str) -> bool:
    return int(hashlib.sha256(instruction.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def instructions(seed: int, held_out: bool | None = False) -> Iterator[str]:
    """An endless, deterministic stream of distinct instructions from one split (None: both)."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    everyday = _everyday()
    functions = _functions()
    python_topics = sorted(topics)
    seen: set[str] = set()
    while True:
        if rng.random() < 0.7:
            s, t = rng.sample(everyday, 2)
            instruction = rng.choice(TEMPLATES).format(s=s, t=t)
        else:
            name, doc = rng.choice(functions)
            instruction = rng.choice(CODE_TEMPLATES).format(
                d=doc, n=name, m=name.rsplit(".", 1)[0], topic=rng.choice(python_topics))
        if instruction in seen or (held_out is not None and is_held_out(instruction) != held_out):
            continue
        seen.add(instruction)
        yield instruction
