"""MODEL on the command line -> a local HF folder or .gguf file.

MODEL is a path (an HF model folder or a .gguf file) or a hub id such as
`EleutherAI/gpt-j-6b`, resolved only from the local huggingface_hub cache:
netp never downloads (huggingface_hub's try_to_load_from_cache, which
never touches the network, then a scan of the cached snapshots).
"""
from __future__ import annotations

import os
from pathlib import Path

from netp.errors import NetpError

_PATH_SUFFIXES = (".gguf", ".bin", ".ne", ".safetensors", ".json")


def hub_cache_dir() -> Path:
    """The hub cache folder in force now (HF_HUB_CACHE may be set after huggingface_hub is imported)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def looks_like_hub_id(model: str) -> bool:
    """A hub id (`gpt2`, `EleutherAI/gpt-j-6b`) rather than a path: huggingface_hub's own rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if model.startswith((".", "/", "~")) or model.endswith(_PATH_SUFFIXES) or model.count("/") > 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _snapshot_from_scan(repo_id: str, cache: Path) -> Path | None:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return None
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model" and repo.revisions:
            # Prefer the revision `main` points at, else the newest.
            revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
            return Path(revisions[-1].snapshot_path)
    return None


def _model_in_snapshot(snapshot: Path) -> Path | None:
    if (snapshot / "config.json").is_file():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def resolve_model(model: str) -> Path:
    """A folder holding config.json, a .gguf file, or a NetpError saying what was looked for."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not looks_like_hub_id(model):
        raise NetpError(model, "no such file or directory")
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    found = try_to_load_from_cache(model, "config.json", cache_dir=cache)
    if isinstance(found, str):
        return Path(found).parent
    snapshot = _snapshot_from_scan(model, cache)
    resolved = _model_in_snapshot(snapshot) if snapshot is not None else None
    if resolved is not None:
        return resolved
    if snapshot is not None:
        raise NetpError(model, f"the cached snapshot {snapshot} holds neither config.json nor one .gguf file")
    raise NetpError(model, f"not a local path, and hub id {model} is not in the local Hugging Face cache "
                           f"({cache}); netp never downloads: fetch it first (huggingface-cli download {model}) "
                           "or pass its folder")
