"""Test helpers: a tiny random Llama (byte-level BPE tokenizer, chat template) made in seconds, ports."""

from __future__ import annotations

import gc
import random
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from raylm.contract import APP_NAME

# Engine arguments and replica environment the tests serve the tiny model with. No dtype: raylm picks it
# from the CPU (hardware.py), so the suite runs the default path, in float32 on CPUs without bf16 units.
TINY_ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 256}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
# The integration service has an API key, as a production one would: every test sends it.
API_KEY = "sk-raylm-integration"
AUTH = {"authorization": f"Bearer {API_KEY}"}
OTHER_KEY = "sk-raylm-other-tenant"  # a second tenant (the Batch API's objects are scoped to one)
LEDGER_KEY = "sk-raylm-ledger-tenant"  # a tenant only the usage test uses: its sums are its own
METERED_KEY = "sk-raylm-metered-tenant"  # a tenant with quotas (METERED_QUOTA)
METERED_QUOTA = {"requests_per_minute": 5, "tokens_per_minute": 4000}
SERVICE_MAX_FILE_BYTES = 210 * 2**20  # the service's upload limit: a 200 MiB upload fits, 2 GiB does not
# What the service's `tiny-think` model is made to write (vLLM structured output) so that its reasoning
# parser (Granite's, which reads these text markers) has reasoning to take apart.
THINKING = (r"Here is my thought process:( [a-z]{4,10}){2,4} Here is my response:( [a-z]{4,10}){2,4}")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve deploys models; vLLM batches requests and streams tokens.",
    "Hello world! 0123456789, a tiny model for fast tests.",
] * 50


def make_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Write the model to `out` (once) and return it."""
    if (out / "config.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, rope_theta=10000.0, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    fast.save_pretrained(out)
    from raylm.models import _patch_json

    _patch_json(out / "config.json", lambda c: (c.pop("rope_parameters", None), c.update(rope_theta=10000.0)))
    _patch_json(out / "tokenizer_config.json", lambda c: c.update(tokenizer_class="PreTrainedTokenizerFast"))
    return out


def make_lora(base: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA adapter of `base` (once), seeded, its B matrices non-zero (PEFT starts them at zero, which
    would change nothing) and large enough that greedy output differs from the base model's."""
    if (out / "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    model.save_pretrained(out)
    return out


# Ports the tests hand to servers come from below the kernel's ephemeral range (where every socket bound to
# port 0 lands: Ray's gRPC servers, agents, clients) and above Ray's worker ports (10002-19999): a port found
# free here stays free until its server binds it, since nothing picks one there by itself. A port picked by
# binding port 0 and closing it was taken by one of Ray's processes before raylm's ingress bound it
# (`make test` on a fresh clone: 9 errors, `Address already in use`).
_WORKER_PORTS_END = 20000


def free_port() -> int:
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = list(range(_WORKER_PORTS_END, low)) if low - _WORKER_PORTS_END >= 1000 else []
    random.shuffle(candidates)
    for port in candidates[:500]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # an unusual ephemeral range: the old way, with its race
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_processes(model: str, among: Iterable[psutil.Process] | None = None) -> list[psutil.Process]:
    """Serve replica processes of `model`, among this process's descendants unless told otherwise."""
    tag = re.compile(rf"ServeReplica:{APP_NAME}:model-{re.escape(model)}(?![\w-])")  # not model-tiny-think
    found = []
    for proc in psutil.Process().children(recursive=True) if among is None else among:
        try:
            if any(tag.search(part) for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


class Steal:
    """The share of CPU time the hypervisor gave to other machines (/proc/stat's steal) since the last call:
    a phase measured while a neighbour took the cores measures the neighbour (seen: 15-23% for a minute)."""

    def __init__(self) -> None:
        self.last = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return ticks[7], sum(ticks)

    def share(self) -> float:
        now = self._read()
        steal, total = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now
        return steal / total if total else 0.0


class CpuTop:
    """Which processes of the machine took the cores between its start and `top()` (share of one core each):
    the service's own, the attacker's, or a neighbour left over from an earlier test."""

    def __init__(self) -> None:
        self.before, self.start = self._read(), time.monotonic()

    @staticmethod
    def _read() -> dict[tuple[int, str], float]:
        out = {}
        for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            times, cmdline = proc.info["cpu_times"], proc.info["cmdline"] or []
            if times is not None:
                name = cmdline[0] if cmdline and cmdline[0].startswith("ray::") else proc.info["name"]
                out[(proc.pid, name[:48])] = times.user + times.system
        return out

    def top(self, n: int = 5) -> str:
        now, span = self._read(), time.monotonic() - self.start
        used = sorted(((v - self.before.get(k, 0.0), k) for k, v in now.items()), reverse=True)[:n]
        return " ".join(f"{name}[{pid}]:{100 * s / span:.0f}%" for s, (pid, name) in used)


class ClientPauses:
    """The test process's own garbage-collection pauses (ms, by generation) while it measures: it imported
    torch, transformers and Ray (the tiny model, the service), and a full collection of its ~500k objects
    took 380-410 ms, which the client would have counted in whichever first tokens it was reading."""

    def __init__(self) -> None:
        self.ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.ms[info["generation"]].append((time.perf_counter() - self._t) * 1e3)

    @property
    def longest_ms(self) -> float:
        return max(max(ms, default=0.0) for ms in self.ms.values())

    def close(self) -> None:
        gc.callbacks.remove(self._on)


def cmdline(proc: psutil.Process) -> list[str]:
    """A process's command line, [] if it is gone or unreadable."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def engine_core(replica: psutil.Process) -> psutil.Process:
    """A model replica's vLLM EngineCore process."""
    return next(p for p in replica.children(recursive=True) if "EngineCore" in " ".join(cmdline(p)) + p.name())


def metric_samples(url: str) -> dict[tuple[str, frozenset], float]:
    """A Prometheus endpoint's samples: {(name, labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric_value(samples, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)
