"""Greedy output through raylm equals vLLM's offline LLM on the same model and engine arguments."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import CPU_ENV, TINY_ENGINE_ARGS
from raylm import hardware

PROMPTS = ["Hello world", "The quick brown fox", "Ray Serve deploys"]
CHAT = [{"role": "user", "content": "Hello world"}]

OFFLINE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model, engine_args, prompts, chat = json.loads(sys.argv[1])
        llm = LLM(model=model, **engine_args)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        texts = [o.outputs[0].text for o in llm.generate(prompts, params)]
        chat_text = llm.chat(chat, params)[0].outputs[0].text
        print("RESULT" + json.dumps({"texts": texts, "chat": chat_text}))
""")


@pytest.mark.slow  # ~70 s (a second vLLM engine, offline): `make test-slow`
def test_greedy_matches_vllm_offline(client, tiny_model, tmp_path):
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE)
    # Offline with the dtype raylm picks on this machine (the replica applies the same rule).
    arg = json.dumps([str(tiny_model), hardware.fit(TINY_ENGINE_ARGS, {}).engine_args, PROMPTS, CHAT])
    proc = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **CPU_ENV})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, proc.stderr[-3000:]
    offline = json.loads(line[len("RESULT"):])

    served = [client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert served == offline["texts"]
    assert chat == offline["chat"]
