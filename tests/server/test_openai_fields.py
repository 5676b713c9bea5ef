"""Every OpenAI request field is honoured or refused with a 400 that names it (the README's field table)."""

import json

import httpx
import openai
import pytest

import spectr
from tests.server.conftest import API_KEY

PROMPT = "w3 w5 w7 w3 w5 w7 w3"
EXTRA = {"k": 2, "L": 3}
MESSAGES = [{"role": "user", "content": "w3 w4 w5"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def _post(server, path, body):
    return httpx.post(f"{server.url}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, json=body, timeout=30)


def test_chat_logprobs_are_the_librarys(client, engine):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=3, logprobs=True,
                                              top_logprobs=3, extra_body=EXTRA)
    expected = spectr.generate(engine, MESSAGES, max_new_tokens=10, seed=3, logprobs=3, **EXTRA)
    content = response.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == [entry.logprob for entry in expected.logprobs]
    assert "".join(entry.token for entry in content) == response.choices[0].message.content == expected.text
    for entry, reference in zip(content, expected.logprobs):
        assert [top.logprob for top in entry.top_logprobs] == [lp for _, lp in reference.top]
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=3, logprobs=True,
                                              top_logprobs=3, stream=True, extra_body=EXTRA)
    pieces = [entry.logprob for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for entry in chunk.choices[0].logprobs.content]
    assert pieces == [entry.logprob for entry in expected.logprobs]


def test_completion_logprobs_in_the_legacy_form(client, engine):
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, seed=1, logprobs=2,
                                         extra_body=EXTRA)
    expected = spectr.generate(engine, PROMPT, max_new_tokens=8, seed=1, logprobs=2, **EXTRA)
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs == [entry.logprob for entry in expected.logprobs]
    assert "".join(logprobs.tokens) == response.choices[0].text == expected.text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_penalties_and_logit_bias_reach_the_sample(client, engine):
    plain = spectr.generate(engine, PROMPT, max_new_tokens=16, seed=5, **EXTRA)
    banned = plain.tokens[0]
    options = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, seed=5,
                                         presence_penalty=1.5, frequency_penalty=0.5, logit_bias={str(banned): -100},
                                         extra_body={**EXTRA, "repetition_penalty": 1.3})
    expected = spectr.generate(engine, PROMPT, max_new_tokens=16, seed=5, logit_bias={banned: -100.0}, **options,
                               **EXTRA)
    assert response.choices[0].text == expected.text != plain.text
    assert banned not in expected.tokens


def test_content_parts_token_ids_and_aliases_equal_their_plain_forms(client, server, engine):
    parts = [{"role": "user", "content": [{"type": "text", "text": "w3 w4"}, {"type": "text", "text": " w5"}]}]
    as_parts = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=8, seed=2,
                                              response_format={"type": "text"}, user="someone", extra_body=EXTRA)
    as_text = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=2, extra_body=EXTRA)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.completion_tokens == as_text.usage.completion_tokens
    ids = engine.tokenizer(PROMPT, add_special_tokens=False).input_ids
    by_ids = _post(server, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 8, "seed": 4, **EXTRA})
    nested = _post(server, "/v1/completions", {"model": "tiny", "prompt": [ids], "max_tokens": 8, "seed": 4, **EXTRA})
    by_text = _post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "seed": 4, **EXTRA})
    texts = [r.json()["choices"][0]["text"] for r in (by_ids, nested, by_text)]
    assert texts[0] == texts[1] == texts[2]


def test_n_choices_repeat_with_a_seed(client, engine):
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, seed=7, n=3, extra_body=EXTRA)
    expected = [spectr.generate(engine, PROMPT, max_new_tokens=10, seed=7 + i, **EXTRA) for i in range(3)]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [e.text for e in expected]
    assert response.usage.completion_tokens == sum(e.stats.new_tokens for e in expected)
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, seed=7, n=2, stream=True,
                                              extra_body=EXTRA)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [spectr.generate(engine, MESSAGES, max_new_tokens=6, seed=7 + i, **EXTRA).text for i in range(2)]


@pytest.mark.parametrize("path,body,field,words", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["tool calling"]),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice", ["tool calling"]),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", ["constrained"]),
    ("/v1/chat/completions", {"top_logprobs": 2}, "body", ["logprobs: true"]),
    ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs", ["20"]),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", ["role"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type", ["'text'"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name",
     ["refused"]),
    ("/v1/completions", {"echo": True}, "echo", ["echo"]),
    ("/v1/completions", {"suffix": "end"}, "suffix", ["suffix"]),
    ("/v1/completions", {"best_of": 3}, "best_of", ["best_of"]),
    ("/v1/completions", {"min_p": 0.1}, "min_p", ["min_p"]),
    ("/v1/completions", {"frobnicate": 1}, "frobnicate", ["refused rather than ignored"]),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty", ["2"]),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty", ["greater than 0"]),
    ("/v1/completions", {"logit_bias": {"5": 101}}, None, ["[-100, 100]"]),
    ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias", ["99999", "vocabulary"]),
    ("/v1/completions", {"logprobs": 21}, "logprobs", ["20"]),
    ("/v1/completions", {"prompt": [[3, 4], [5]]}, "prompt", ["one prompt"]),
    ("/v1/completions", {"prompt": [3, 999999]}, "prompt", ["vocabulary"]),
    ("/v1/completions", {"prompt": []}, "prompt", ["empty"]),
    ("/v1/completions", {"k": 9}, "k", ["limit of 8"]),
    ("/v1/completions", {"L": 20}, "L", ["limit of 8"]),
    ("/v1/completions", {"budget": 100, "tree": "dynamic"}, "budget", ["limit of 64"]),
    ("/v1/completions", {"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra", ["refused"]),
])
def test_a_field_not_honoured_is_refused_by_name(server, path, body, field, words):
    base = {"model": "tiny", "max_tokens": 4}
    base.update({"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": PROMPT})
    response = _post(server, path, {**base, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    if field is not None:
        assert error["param"] == field, error
    for word in words:
        assert word in error["message"], error
    assert _post(server, path, base).status_code == 200  # the server goes on serving
