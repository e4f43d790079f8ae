import pytest

from raylm.engine.vllm import VLLMEngine


def test_engine_args_pass_through_untouched():
    args = VLLMEngine("/m", "name", "generate", {"max_model_len": 512, "enforce-eager": True}).build_args()
    assert (args.model, args.served_model_name, args.max_model_len, args.enforce_eager) == (
        "/m", ["name"], 512, True)


def test_embed_task_uses_the_pooling_runner():
    assert VLLMEngine("/m", "e", "embed", {}).build_args().runner == "pooling"


def test_unknown_engine_argument_is_refused():
    with pytest.raises(ValueError, match="max_modle_len"):
        VLLMEngine("/m", "n", "generate", {"max_modle_len": 1}).build_args()


def test_a_mapping_is_parsed_as_vllm_serve_parses_it():
    """vLLM makes some config objects from a mapping only on its command line (structured_outputs_config)."""
    from vllm.config import StructuredOutputsConfig

    args = VLLMEngine("/m", "n", "generate", {"structured_outputs_config": {"enable_in_reasoning": True},
                                              "override_generation_config": {"temperature": 0.0}}).build_args()
    assert isinstance(args.structured_outputs_config, StructuredOutputsConfig)
    assert args.structured_outputs_config.enable_in_reasoning is True
    assert args.override_generation_config == {"temperature": 0.0}


def _child_saw(path: str) -> None:
    """In place of EngineCore's entry point: what the forked process starts with."""
    import gc
    import json
    import os
    from pathlib import Path

    import torch

    Path(path).write_text(json.dumps({"cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                                      "name": Path("/proc/self/comm").read_text().strip(),
                                      "title": Path("/proc/self/cmdline").read_text().split("\0")[0],
                                      "env": os.environ.get("RAYLM_TEST_SET_LATE"),
                                      "frozen": gc.get_freeze_count()}))


@pytest.mark.parametrize("start", ["fork", "forkserver", "spawn"])
def test_engine_core_is_forked_onto_its_cores_with_its_name_and_vllm_is_left_as_it_was(start, tmp_path, monkeypatch):
    """The forked EngineCore takes the OpenMP layout a spawned one reads from its environment (one thread per
    bound core, on them), vLLM's process name, and the replica's environment of the moment it starts (a
    forkserver was started before it: as a replica's is), and from a forkserver, a heap out of the collector's
    reach (frozen_heap: vLLM's full collections while it starts walk none of it); RAYLM_ENGINE_CORE_START=spawn
    leaves vLLM's start alone."""
    import json

    from raylm import _vllm
    from raylm.engine.vllm import engine_core_by_fork, start_forkserver

    monkeypatch.setenv("RAYLM_ENGINE_CORE_START", start)
    assert start_forkserver() is (start == "forkserver")
    monkeypatch.setenv("RAYLM_TEST_SET_LATE", "seen")  # after the forkserver started: as the replica's fit does
    utils = _vllm.module("get_mp_context")
    original, out = utils.get_mp_context, tmp_path / "child.json"
    with engine_core_by_fork([0]):
        if start == "spawn":
            assert utils.get_mp_context is original
            return
        proc = utils.get_mp_context().Process(target=_child_saw, name="EngineCore", kwargs={"path": str(out)})
        proc.start()
        proc.join(60)
    assert utils.get_mp_context is original and proc.exitcode == 0
    saw = json.loads(out.read_text())
    frozen = saw.pop("frozen")
    assert saw == {"cores": [0], "threads": 1, "name": "VLLM::EngineCor", "title": "VLLM::EngineCore", "env": "seen"}
    if start == "forkserver":  # torch and vLLM's engine, imported by the forkserver: hundreds of thousands
        assert frozen > 100_000, frozen
