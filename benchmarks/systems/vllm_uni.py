"""Bare `vllm serve` with raylm's CPU engine layout: the worker inside the EngineCore process.

    python benchmarks/systems/vllm_uni.py [vllm serve flags]

vLLM's CPU platform turns the one-worker `uni` executor into `mp` (a worker process of its own) while it
builds the config; this reference keeps `uni`, as raylm does (raylm.engine.vllm.cpu_layout), so a
comparison can tell the layout's gain from the serving path's.
"""

import os
import runpy

from vllm.platforms import cpu

_check = cpu.CpuPlatform.check_and_update_config.__func__


def _keep_uni(cls, vllm_config):
    # The platform flips `uni` to `mp` when it reads VLLM_ENABLE_V1_MULTIPROCESSING=1 here; the engine
    # still runs in its own process, which reads the variable again later.
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        _check(cls, vllm_config)
    finally:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved


if __name__ == "__main__":
    cpu.CpuPlatform.check_and_update_config = classmethod(_keep_uni)
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
