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
    from vllm.lora.request import LoRARequest

    if __name__ == "__main__":
        model, engine_args, prompts, chat, loras = json.loads(sys.argv[1])
        llm = LLM(model=model, **engine_args)
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        texts = [o.outputs[0].text for o in llm.generate(prompts, params)]
        chat_text = llm.chat(chat, params)[0].outputs[0].text
        adapters = {name: [o.outputs[0].text for o in llm.generate(prompts, params,
                                                                 lora_request=LoRARequest(name, n + 1, path))]
                    for n, (name, path) in enumerate(loras)}
        print("RESULT" + json.dumps({"texts": texts, "chat": chat_text, "adapters": adapters}))
""")


def offline(model, engine_args: dict, tmp_path, loras: dict[str, str] | None = None) -> dict:
    """vLLM's offline LLM on the model, with the dtype raylm picks on this machine (the replica applies the
    same rule): greedy texts of PROMPTS and CHAT, and of PROMPTS through each adapter of `loras`."""
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE)
    arg = json.dumps([str(model), hardware.fit(engine_args, {}).engine_args, PROMPTS, CHAT,
                      list((loras or {}).items())])
    proc = subprocess.run([sys.executable, str(script), arg], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **CPU_ENV})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow  # ~70 s (a second vLLM engine, offline): `make test-slow`
def test_greedy_matches_vllm_offline(client, tiny_model, tmp_path):
    offline_ = offline(tiny_model, TINY_ENGINE_ARGS, tmp_path)
    served = [client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert served == offline_["texts"]
    assert chat == offline_["chat"]


@pytest.mark.slow  # ~70 s: `make test-slow`
def test_adapters_match_vllm_offline_with_the_same_lora_request(client, service, tiny_model, tmp_path):
    model = next(m for m in service.config.models if m.name == "tiny-lora")
    args = {**TINY_ENGINE_ARGS, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8}
    expected = offline(tiny_model, args, tmp_path, model.adapters)
    for name in model.adapters:
        served = [client.completions.create(model=name, prompt=p, max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
        assert served == expected["adapters"][name], name
    assert expected["adapters"]["tiny-a"] != expected["texts"]  # the adapter changes the answer
