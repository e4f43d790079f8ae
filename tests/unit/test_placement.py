"""Placement of an engine of several workers: one placement group per replica, a bundle per worker."""

from raylm.config import ModelConfig
from raylm.serve.control.builder import engine_args, serve_options


def test_tensor_parallel_2_gets_a_packed_group_with_a_gpu_per_worker():
    model = ModelConfig(name="m", source="/m", num_cpus=2, num_gpus=2, engine_args={"tensor_parallel_size": 2})
    options = serve_options(model)
    assert options["placement_group_bundles"] == [{"CPU": 2, "GPU": 1.0}, {"GPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert (options["ray_actor_options"]["num_cpus"], options["ray_actor_options"]["num_gpus"]) == (2, 0.0)
    assert engine_args(model)["distributed_executor_backend"] == "ray"


def test_tp_8_by_pp_2_is_sixteen_bundles_and_a_users_backend_wins():
    model = ModelConfig(name="m", source="/m", num_gpus=16, engine_args={
        "tensor_parallel_size": 8, "pipeline_parallel_size": 2, "distributed_executor_backend": "mp"})
    options = serve_options(model)
    assert len(options["placement_group_bundles"]) == 16 and options["placement_group_strategy"] == "PACK"
    assert engine_args(model)["distributed_executor_backend"] == "mp"


def test_one_worker_needs_no_group():
    options = serve_options(ModelConfig(name="m", source="/m", num_gpus=1))
    assert "placement_group_bundles" not in options and options["ray_actor_options"]["num_gpus"] == 1
    assert "distributed_executor_backend" not in engine_args(ModelConfig(name="m", source="/m"))
