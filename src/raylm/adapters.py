"""LoRA adapters' sources: a local folder, or an HF id read offline from the HF cache (never downloaded).

An adapter folder is what PEFT's `save_pretrained` writes: `adapter_config.json` (its rank `r`) and the
weights. The config checks each one when it loads and the admin routes check one before it is registered, so a
missing folder or a rank over the model's limit names the adapter instead of failing a replica.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

# What vLLM's max_lora_rank takes (vllm/config/lora.py MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONFIG_FILE = "adapter_config.json"


def resolve_adapter(source: str) -> Path:
    """The adapter's folder: `source` itself, or an HF id's snapshot in the local HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise ValueError(f"no adapter folder {source}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):
        raise ValueError(f"{source} is neither a folder nor an HF id in the local HF cache") from None


def adapter_rank(folder: Path) -> int:
    """The adapter's LoRA rank, from its PEFT config."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{folder} has no readable {CONFIG_FILE} (a PEFT LoRA adapter's)") from None
    rank = config.get("r")
    if config.get("peft_type", "LORA") != "LORA" or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{folder / CONFIG_FILE} is not a LoRA adapter's config (peft_type LORA, an int `r`)")
    return rank


def check_adapter(name: str, source: str, max_rank: int) -> Path:
    """The adapter's folder, checked: it exists, it is a LoRA adapter, its rank fits. Errors name it."""
    try:
        folder = resolve_adapter(source)
        rank = adapter_rank(folder)
    except ValueError as exc:
        raise ValueError(f"adapter {name!r}: {exc}") from None
    if rank > max_rank:
        raise ValueError(f"adapter {name!r} has rank {rank}, over max_lora_rank {max_rank}: raise lora.max_lora_rank "
                         f"to one of {', '.join(str(r) for r in LORA_RANKS if r >= rank)}")
    return folder


def adapter_folders(adapters: Mapping[str, str], max_rank: int) -> dict[str, str]:
    """A model's adapters, name → source, as name → folder, each checked (`check_adapter`)."""
    return {name: str(check_adapter(name, source, max_rank)) for name, source in adapters.items()}
