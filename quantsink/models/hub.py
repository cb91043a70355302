"""Pretrained files from the local Hugging Face cache, without ever waiting on the network.

Every adapter that loads published weights (transformers, open_clip, timm) asks here first with
`local_files_only`, and only goes online when the user has not declared the machine offline.
A miss becomes one ModelLoadError that says how to get the files onto this machine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from quantsink.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Weights are read from safetensors only: pickled formats are never fetched.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]

_FETCH_ERRORS = (HfHubHTTPError, OSError, ValueError)


def offline() -> bool:
    """Whether the user declared the machine offline (read now: tests and users set it late)."""
    declared = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return declared or bool(constants.HF_HUB_OFFLINE)


def not_cached(what: str, repo_id: str, cause: object, filename: str = "") -> ModelLoadError:
    download = f"hf download {repo_id} {filename}".rstrip()
    return ModelLoadError(
        f"{what} is not in the local Hugging Face cache and cannot be downloaded ({_first_line(cause)}): "
        f"pass a local folder instead (quantsink quantize /path/to/folder ...), or fill the cache on a "
        f"machine with network ({download}) and point HF_HOME at it"
    )


def snapshot(what: str, repo_id: str) -> Path:
    """The local folder of a hub repository's weights, config and preprocessing files."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, *_FETCH_ERRORS) as cached_miss:
        if offline():
            raise not_cached(what, repo_id, cached_miss) from None
    logger.info("downloading %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS))
    except _FETCH_ERRORS as error:
        raise not_cached(what, repo_id, error) from None


def hub_file(what: str, repo_id: str, filename: str) -> Path:
    """One file of a hub repository, from the cache when it is there."""
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except (LocalEntryNotFoundError, *_FETCH_ERRORS) as cached_miss:
        if offline():
            raise not_cached(what, repo_id, cached_miss, filename) from None
    logger.info("downloading %s/%s from the Hugging Face hub", repo_id, filename)
    # snapshot_download gives up at once without network, where hf_hub_download retries for ~20 s
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=[filename])) / filename
    except _FETCH_ERRORS as error:
        raise not_cached(what, repo_id, error, filename) from None
    if not path.is_file():
        raise ModelLoadError(f"{what}: the hub repository {repo_id} has no {filename}")
    return path


def _first_line(cause: object) -> str:
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
