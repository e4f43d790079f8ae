"""An impossible config is refused before deploying, with what it asked for."""

from raylm.config import AppConfig, ModelConfig, load_config
from raylm.serve.control.capacity import GiB, RUNTIME_BYTES, WARM_WORKER_BYTES, demand, shortfalls


def test_the_default_config_with_two_replicas_does_not_fit_two_cores():
    config = load_config(replicas=2)  # the case: 2 × 1.0 + 2 × 0.5 + 0.1 CPUs
    need = demand(config, lambda m: 0)
    assert need.cpus == 3.1
    problems = shortfalls(need, {"CPU": 2.0}, free_memory=None)
    assert "needs 3.1 CPUs at start, the cluster has 2" in problems[0]
    assert any("smollm2-135m-instruct: 2 × (1 CPU" in p for p in problems)
    assert shortfalls(demand(load_config(), lambda m: 0), {"CPU": 2.0}, None) == []


def test_memory_counts_weights_kv_cache_and_runtime_per_replica_and_warm_workers():
    config = AppConfig.model_validate({"models": [
        {"name": "a", "source": "/m/a", "replicas": 2, "num_cpus": 0.5, "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}},
        {"name": "b", "source": "/m/b", "autoscaling": {"min_replicas": 0, "max_replicas": 3}}]})
    need = demand(config, lambda m: GiB)
    # b starts at zero replicas, with the warm worker an autoscaled model keeps for its next one
    assert need.memory == 2 * (GiB + 2 * GiB + RUNTIME_BYTES) + WARM_WORKER_BYTES
    assert shortfalls(need, {"CPU": 8.0}, free_memory=4 * GiB)[0].startswith("the config needs about 9.6 GiB")
    assert "b: 0 × (1 CPU, 0 GPU, 2.5 GiB) + 1 warm worker(s)" in need.lines


def test_gpus_are_checked_too():
    config = AppConfig.model_validate({"models": [{"name": "a", "source": "/m/a", "num_gpus": 1}]})
    assert "needs 1 GPUs at start, the cluster has 0" in shortfalls(demand(config, lambda m: 0), {"CPU": 4}, None)[0]


def test_the_gpu_memory_arithmetic_of_a_70b_model_on_tp_8(tmp_path):
    import json

    from raylm.serve.control.capacity import gpu_plan, kv_bytes_per_token

    llama_70b = {"num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                 "hidden_size": 8192}
    assert kv_bytes_per_token(llama_70b) == 2 * 80 * 8 * 128 * 2  # 320 KiB: GQA keeps 8 of 64 heads
    (tmp_path / "config.json").write_text(json.dumps(llama_70b))
    model = ModelConfig(name="llama-70b", source=str(tmp_path), num_gpus=8,
                        engine_args={"tensor_parallel_size": 8})
    plan = gpu_plan(model, str(tmp_path), int(141.1 * GiB))
    assert "weights 17.6 GiB" in plan and "KV cache 40 KiB per token" in plan
    assert gpu_plan(model.model_copy(update={"num_gpus": 0}), str(tmp_path), 0) is None
