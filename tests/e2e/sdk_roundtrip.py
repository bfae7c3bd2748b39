"""Drives `tollgate up` with the real openai SDK and checks every answer is identical to the
simulator's own answer to the same call. Prints the token totals Tollgate must report, as JSON
on the last line. Any difference fails with an AssertionError (non-zero exit)."""

import argparse
import json

from common import strip
from openai import AzureOpenAI

API_VERSION = "2024-10-21"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--sim", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--sim-key", required=True)
    a = ap.parse_args()

    proxy = AzureOpenAI(azure_endpoint=a.proxy, api_key=a.key, api_version=API_VERSION, max_retries=0)
    direct = AzureOpenAI(azure_endpoint=a.sim, api_key=a.sim_key, api_version=API_VERSION, max_retries=0)
    totals = {"requests": 0, "inputTokens": 0, "outputTokens": 0, "totalTokens": 0}

    def add(prompt, completion):
        totals["requests"] += 1
        totals["inputTokens"] += prompt
        totals["outputTokens"] += completion
        totals["totalTokens"] += prompt + completion

    def both(call, **kw):
        return call(proxy, **kw), call(direct, **kw)

    msgs = [
        {"role": "system", "content": "You answer in one paragraph."},
        {"role": "user", "content": "What does a gateway do?"},
    ]

    # Chat, non-stream.
    p, d = both(lambda c, **kw: c.chat.completions.create(**kw), model="gpt-4o", messages=msgs)
    assert strip(p) == strip(d), "chat differs"
    add(p.usage.prompt_tokens, p.usage.completion_tokens)

    # Streaming chat with include_usage: identical chunks, usage in the last one.
    def stream(c, **kw):
        return [strip(ch) for ch in c.chat.completions.create(stream=True, **kw)]

    kw = {"model": "gpt-4o-mini", "messages": msgs, "stream_options": {"include_usage": True}}
    p, d = both(stream, **kw)
    assert p == d, "streamed chat with usage differs"
    assert p[0]["choices"] == [] and p[0]["prompt_filter_results"], "prompt annotation chunk first"
    usage = p[-1]["usage"]
    assert usage and p[-1]["choices"] == []
    add(usage["prompt_tokens"], usage["completion_tokens"])

    # Streaming chat without include_usage: the SDK sees no usage anywhere and the same chunks
    # as a direct call, although Tollgate asked AOAI for the usage on its behalf (and bills
    # that), which must equal what the simulator reports for the same request.
    kw = {"model": "gpt-4o", "messages": msgs + [{"role": "user", "content": "Again."}]}
    p, d = both(stream, **kw)
    assert p == d, "streamed chat without usage differs"
    assert all(ch["usage"] is None for ch in p)
    text = "".join(ch["choices"][0]["delta"]["content"] or "" for ch in p if ch["choices"])
    plain = direct.chat.completions.create(**kw)
    assert plain.choices[0].message.content == text, "stream and non-stream carry the same text"
    add(plain.usage.prompt_tokens, plain.usage.completion_tokens)

    # Tool calls, non-stream and streamed.
    tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
         "parameters": {"type": "object", "properties": {
             "city": {"type": "string", "description": "City name"},
             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time.",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    ]
    kw = {"model": "gpt-4o", "messages": msgs, "tools": tools, "tool_choice": "required"}
    p, d = both(lambda c, **kw: c.chat.completions.create(**kw), **kw)
    assert strip(p) == strip(d), "tool calls differ"
    calls = p.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    for c in calls:
        json.loads(c.function.arguments)
    add(p.usage.prompt_tokens, p.usage.completion_tokens)

    p, d = both(stream, stream_options={"include_usage": True}, **kw)
    assert p == d, "streamed tool calls differ"
    usage = p[-1]["usage"]
    add(usage["prompt_tokens"], usage["completion_tokens"])

    # Embeddings (the SDK asks for base64 and decodes it).
    p, d = both(lambda c, **kw: c.embeddings.create(**kw), model="text-embedding-3-small",
                input=["first text", "second text"])
    assert strip(p) == strip(d), "embeddings differ"
    assert len(p.data) == 2 and len(p.data[0].embedding) == 1536
    add(p.usage.prompt_tokens, 0)

    print(json.dumps(totals))


if __name__ == "__main__":
    main()
