import json

import pytest

from raylm import models


def test_local_path_and_hf_id(tmp_path):
    assert models.resolve_source(str(tmp_path), tmp_path) == str(tmp_path.resolve())
    assert models.resolve_source("org/some-model", tmp_path) == "org/some-model"


def test_unknown_bundled_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown bundled model"):
        models.resolve_source("bundled:gpt-5", tmp_path)


def test_minilm_comes_from_its_package(tmp_path):
    path = models.resolve_source("bundled:all-minilm-l6-v2", tmp_path)
    assert json.loads((models.Path(path) / "config.json").read_text())["hidden_size"] == 384


def test_smollm2_conversion_is_cached_and_vllm_readable():
    cache = models.default_cache_dir()
    first = models.prepare_smollm2(cache)
    assert models.prepare_smollm2(cache) == first  # second call reuses the folder
    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0 and "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    tok = json.loads((first / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (first / "model.safetensors").stat().st_size > 200_000_000
    assert not list(first.parent.glob(".smollm2-*"))  # no half-written folders left
