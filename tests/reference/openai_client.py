"""Talks to a running `gpt2kit serve` through the official `openai` Python client, as users do.

Usage: openai_client.py BASE_URL API_KEY MODEL OUT.json
Writes what the client got back (texts, logprobs, finish reasons, error statuses) to OUT.json;
the Rust test compares it with `gpt2kit infer` and with the server's raw-HTTP answers.
"""
import json
import sys

import openai

base_url, api_key, model, out = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
res = {}

greedy = dict(model=model, prompt="Hello", max_tokens=8, temperature=0)
c = client.completions.create(**greedy)
res["plain"] = {
    "text": c.choices[0].text,
    "finish_reason": c.choices[0].finish_reason,
    "object": c.object,
    "model": c.model,
    "usage": [c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens],
}

chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **greedy))
res["streamed"] = {
    "text": "".join(ch.choices[0].text for ch in chunks if ch.choices),
    "finish_reason": [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1],
    "usage": [chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens]
    if chunks[-1].usage
    else None,
}

# n > 1, seeded, with vLLM's extra processor fields through extra_body.
c = client.completions.create(
    model=model, prompt=["The", "A"], max_tokens=5, n=2, seed=7, temperature=0.9,
    extra_body={"top_k": 20, "repetition_penalty": 1.1},
)
res["n"] = sorted([ch.index, ch.text] for ch in c.choices)

c = client.completions.create(logprobs=2, **greedy)
lp = c.choices[0].logprobs
res["logprobs"] = {
    "tokens": lp.tokens,
    "token_logprobs": lp.token_logprobs,
    "top_logprobs": lp.top_logprobs,
    "text_offset": lp.text_offset,
}

c = client.completions.create(echo=True, **greedy)
res["echo"] = c.choices[0].text

c = client.completions.create(stop=[" "], **greedy)
res["stop"] = [c.choices[0].text, c.choices[0].finish_reason]

chat = dict(model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0)
c = client.chat.completions.create(**chat)
res["chat"] = {"content": c.choices[0].message.content, "role": c.choices[0].message.role,
               "finish_reason": c.choices[0].finish_reason}
chunks = list(client.chat.completions.create(stream=True, **chat))
res["chat_streamed"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

res["models"] = [m.id for m in client.models.list().data]


def error_of(call):
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return [e.status_code, body.get("message", str(body)), body.get("param")]
    return None


res["errors"] = {
    "max_tokens": error_of(lambda: client.completions.create(model=model, prompt="Hi", max_tokens=-3)),
    "unknown_field": error_of(
        lambda: client.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body={"frobnicate": 1})
    ),
    "wrong_key": error_of(
        lambda: openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).completions.create(**greedy)
    ),
}
# The server still answers after the refusals.
res["after"] = client.completions.create(**greedy).choices[0].text

with open(out, "w") as f:
    json.dump(res, f)
