"""Engine defaults fitted to the machine: dtype by the CPU's bf16 units, OpenMP threads on every core."""

import json

from raylm import hardware
from raylm.hardware import BIND_ENV, GIB, KV_ENV, Hardware, cpu_list, detect, fit, parse_cpu_list

AVX2 = Hardware(gpus=0, cpu_flags=frozenset({"avx2", "fma"}), cores=(0, 1), numa_nodes=1)
AVX512_BF16 = Hardware(gpus=0, cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}), cores=(0, 1, 2, 3),
                       numa_nodes=1)


def test_float32_without_bf16_units_and_bfloat16_with_them():
    assert fit({}, {}, AVX2).engine_args["dtype"] == "float32"
    assert fit({}, {}, AVX512_BF16).engine_args["dtype"] == "bfloat16"
    assert "avx512_bf16" in fit({}, {}, AVX512_BF16).notes[0]


def test_the_users_choices_win():
    chosen = fit({"dtype": "float16", "max_model_len": 64, "enforce_eager": False}, {BIND_ENV: "1", KV_ENV: "2"},
                 AVX512_BF16)
    assert chosen.engine_args == {"dtype": "float16", "max_model_len": 64, "enforce_eager": False}
    assert chosen.env == {BIND_ENV: "1", KV_ENV: "2"}
    assert all("set in the config" in note for note in chosen.notes)


def test_a_cpu_engine_runs_eager_unless_the_config_sets_its_compilation():
    assert fit({}, {}, AVX2).engine_args["enforce_eager"] is True
    assert "enforce_eager" not in fit({"compilation_config": {"mode": 3}}, {}, AVX2).engine_args
    gpu = Hardware(gpus=1, cpu_flags=frozenset(), cores=(0,), numa_nodes=1)
    assert "enforce_eager" not in fit({}, {}, gpu).engine_args


def test_the_console_says_which_of_vllms_cpu_libraries_a_replica_preloads(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_libraries", lambda: {"iomp": "/v/lib/libiomp5.so"})
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert not any("preloaded" in note for note in fit({}, {}, AVX2).notes)  # the default: cpu_tips.py
    monkeypatch.setenv("LD_PRELOAD", "/v/lib/libiomp5.so")  # a model's env sets it
    assert "Intel OpenMP preloaded" in fit({}, {}, AVX2).notes


def test_the_console_says_how_openmp_threads_wait_when_the_config_says():
    assert not any("wait" in note for note in fit({}, {}, AVX2).notes)  # libgomp's own
    assert "OpenMP threads wait: OMP_WAIT_POLICY=PASSIVE (set in the config)" in fit(
        {}, {"OMP_WAIT_POLICY": "PASSIVE"}, AVX2).notes


def test_threads_bind_every_core_on_one_numa_node_and_are_left_to_vllm_on_several():
    assert fit({}, {}, AVX512_BF16).env[BIND_ENV] == "0-3"
    two_nodes = Hardware(gpus=0, cpu_flags=frozenset(), cores=tuple(range(8)), numa_nodes=2)
    assert BIND_ENV not in fit({}, {}, two_nodes).env


def test_a_gpu_keeps_the_models_dtype():
    gpu = Hardware(gpus=1, cpu_flags=frozenset({"avx2"}), cores=(0, 1), numa_nodes=1)
    assert "dtype" not in fit({}, {}, gpu).engine_args and BIND_ENV not in fit({}, {}, gpu).env


def test_cpu_list_ranges():
    assert cpu_list((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    assert cpu_list((3,)) == "3"
    assert parse_cpu_list("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]


def test_detect_reads_this_machine():
    hw = detect()
    assert hw.cores and hw.numa_nodes >= 1 and hw.gpus == 0


def test_a_data_stage_keeps_the_users_thread_binding():
    from raylm.data.llm_stages import fit_here

    hw = Hardware(gpus=0, cpu_flags=frozenset({"avx2"}), cores=(0, 1, 2, 3), numa_nodes=1)
    assert fit_here({}, {"VLLM_CPU_OMP_THREADS_BIND": "2-3"}, hw).env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"
    assert fit_here({}, {}, hw).env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3"  # unset: every core


def test_a_kv_cache_the_config_does_not_size_is_fitted_to_the_model_and_the_free_memory(tmp_path):
    """SmolLM2-135M's shape: 30 layers, 3 KV heads of 64, float32 here: 45 KiB a token."""
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
        "max_position_embeddings": 8192}))
    per_token = 2 * 30 * 3 * 64 * 4
    machine = Hardware(gpus=0, cpu_flags=frozenset({"avx2"}), cores=(0, 1), numa_nodes=1, memory_available=20 * GIB)

    def size(args, model_dir=str(tmp_path), hw=machine):
        return fit(args, {}, hw, model_dir).engine_args["kv_cache_memory_bytes"]

    assert size({"max_num_seqs": 4, "max_model_len": 1024}) == 4 * 1024 * per_token  # all it can use
    assert size({"max_num_seqs": 40, "max_model_len": 4096}) == 4 * GIB  # capped: a fifth of 20 GiB free
    assert size({"max_num_seqs": 1}) == 8192 * per_token  # the model's own context when the config sets none
    small = Hardware(gpus=0, cpu_flags=frozenset(), cores=(0,), numa_nodes=1, memory_available=GIB)
    assert size({"max_num_seqs": 40}, hw=small) == GIB  # at least 1 GiB
    assert size({"max_num_seqs": 40, "max_model_len": 32768}, hw=small) == 32768 * per_token  # one sequence
    assert size({"max_num_seqs": 40}, model_dir=str(tmp_path / "nowhere")) == 4 * GIB  # shape unknown: the cap
    assert "KV cache 4.00 GiB (40 sequences x 8192 tokens x 45 KiB" in "; ".join(
        fit({"max_num_seqs": 40}, {}, machine, str(tmp_path)).notes)
    for sized in ({"kv_cache_memory_bytes": GIB}, {"gpu_memory_utilization": 0.5}):
        assert fit(sized, {}, machine, str(tmp_path)).engine_args == {**sized, "dtype": "float32",
                                                                      "enforce_eager": True}
    assert "kv_cache_memory_bytes" not in fit({}, {KV_ENV: "1"}, machine, str(tmp_path)).engine_args
