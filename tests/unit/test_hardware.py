"""Engine defaults fitted to the machine: dtype by the CPU's bf16 units, OpenMP threads on every core."""

from raylm.hardware import BIND_ENV, Hardware, cpu_list, detect, fit, parse_cpu_list

AVX2 = Hardware(gpus=0, cpu_flags=frozenset({"avx2", "fma"}), cores=(0, 1), numa_nodes=1)
AVX512_BF16 = Hardware(gpus=0, cpu_flags=frozenset({"avx2", "avx512f", "avx512_bf16"}), cores=(0, 1, 2, 3),
                       numa_nodes=1)


def test_float32_without_bf16_units_and_bfloat16_with_them():
    assert fit({}, {}, AVX2).engine_args["dtype"] == "float32"
    assert fit({}, {}, AVX512_BF16).engine_args["dtype"] == "bfloat16"
    assert "avx512_bf16" in fit({}, {}, AVX512_BF16).notes[0]


def test_the_users_choices_win():
    chosen = fit({"dtype": "float16", "max_model_len": 64}, {BIND_ENV: "1"}, AVX512_BF16)
    assert chosen.engine_args == {"dtype": "float16", "max_model_len": 64}
    assert chosen.env == {BIND_ENV: "1"}
    assert all("set in the config" in note for note in chosen.notes)


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
