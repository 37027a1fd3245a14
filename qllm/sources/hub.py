"""Is the Hugging Face hub reachable for a repo? One quick probe per repo, answered before anything is loaded."""

from __future__ import annotations

import functools
import urllib.error
import urllib.request
from typing import Optional


def cached(repo: str, repo_type: str, filename: str, revision: str = "main") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, revision=revision, repo_type=repo_type), str)


@functools.lru_cache(maxsize=None)
def unreachable(repo: str, repo_type: str = "model", revision: str = "main") -> Optional[str]:
    """None when the hub answers for this repo (a gated repo answers 401/403: reachable, needs a token), else why not.
    One HEAD request with a 5 s timeout: huggingface_hub's own retries take ~25 s to give up offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    kind = "datasets" if repo_type == "dataset" else "models"
    url = f"{constants.ENDPOINT}/api/{kind}/{repo}/revision/{revision}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
    except urllib.error.HTTPError as e:
        return None if e.code in (401, 403) else f"{repo} not found on the hub (HTTP {e.code})"
    except (urllib.error.URLError, OSError) as e:
        return f"the hub is not reachable ({getattr(e, 'reason', e)})"
    return None
