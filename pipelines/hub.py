"""The Hugging Face Hub through huggingface_hub: resolving model ids through its cache."""

from __future__ import annotations

import os
from pathlib import Path

# what a pipeline folder needs; other files in a repo (e.g. fp16 copies, .ckpt) are not fetched
ALLOW_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.json", "*/*.txt",
                  "*.md"]


def download(repo_id: str, revision: str | None = None) -> Path:
    """A Hub model repo's snapshot folder, from huggingface_hub's cache (offline when cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hint = ("HF_HUB_OFFLINE is set and it is not in the local cache"
                if offline else "it could not be fetched and is not in the local cache")
        raise FileNotFoundError(f"model {repo_id!r} (revision {revision or 'main'}): {hint}") from err
