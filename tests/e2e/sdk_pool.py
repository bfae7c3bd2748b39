"""Drives `tollgate up` in front of a pool of two simulators with the real openai SDK on the
`/openai/v1` surface (`OpenAI(base_url=...)`, the deployment named in `model`): chat,
streamed chat, embeddings and the Responses API must answer exactly as a simulator answers
directly, and a file uploaded through the pool must be found by every later call on its id
(files are pinned to one backend; balanced, half the retrievals would meet the other
simulator's 404). Prints what Tollgate must have recorded, as JSON on the last line."""

import argparse
import json
import os
import tempfile

from common import strip
from openai import OpenAI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--sim", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--sim-key", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()

    proxy = OpenAI(base_url=a.proxy.rstrip("/") + "/openai/v1/", api_key=a.key, max_retries=0)
    direct = OpenAI(base_url=a.sim.rstrip("/") + "/openai/v1/", api_key=a.sim_key, max_retries=0)
    balanced = 0

    msgs = [{"role": "user", "content": "What does a gateway do?"}]
    for i in range(a.rounds):
        kw = {"model": "gpt-4o", "messages": msgs + [{"role": "user", "content": f"Round {i}."}]}
        p, d = proxy.chat.completions.create(**kw), direct.chat.completions.create(**kw)
        assert strip(p) == strip(d), "v1 chat differs"
        p = [strip(c) for c in proxy.chat.completions.create(stream=True, **kw)]
        d = [strip(c) for c in direct.chat.completions.create(stream=True, **kw)]
        assert p == d, "v1 streamed chat differs"
        kw = {"model": "text-embedding-3-small", "input": [f"text {i}"]}
        p, d = proxy.embeddings.create(**kw), direct.embeddings.create(**kw)
        assert strip(p) == strip(d), "v1 embeddings differ"
        # Not stored: balanced like any call.
        kw = {"model": "gpt-4o", "input": f"Say hello, round {i}.", "store": False}
        p, d = proxy.responses.create(**kw), direct.responses.create(**kw)
        assert p.output_text == d.output_text, "v1 responses differ"
        assert p.usage.model_dump() == d.usage.model_dump()
        balanced += 4

    content = b'{"custom_id": "r1", "method": "POST", "url": "/chat/completions"}\n'
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        f.write(content)
        path = f.name
    try:
        with open(path, "rb") as fh:
            uploaded = proxy.files.create(file=fh, purpose="batch")
    finally:
        os.unlink(path)
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(content)
    retrievals = 6
    for _ in range(retrievals):
        got = proxy.files.retrieve(uploaded.id)
        assert got.id == uploaded.id and got.bytes == len(content)
    assert proxy.files.content(uploaded.id).read() == content
    assert uploaded.id in [f.id for f in proxy.files.list()]
    assert proxy.files.delete(uploaded.id).deleted
    pinned = 1 + retrievals + 3

    print(json.dumps({"balanced": balanced, "pinned": pinned}))


if __name__ == "__main__":
    main()
