"""One OpenAI-compatible chat endpoint (`POST <base_url>/chat/completions`), as the judge talks to it.

Retries with exponential backoff and jitter on what passes (connection errors, timeouts, 408/409/429, 5xx); a
refusal that will not pass (400, 401, 403, 404) fails at once with the endpoint's own message. The API key goes only
into the Authorization header: it is never printed, logged or written.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

import httpx

RETRIED_STATUS = (408, 409, 429, 500, 502, 503, 504)
MAX_WAIT_S = 60.0


class JudgeError(RuntimeError):
    """The judge could not answer (after its retries), or refused the request."""


def host_of(url: str) -> str:
    return urlsplit(url).netloc or url


def api_key(judge: dict) -> Optional[str]:
    env = judge.get("api_key_env")
    return os.environ.get(env) if env else None


def _headers(key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def check(base_url: str, key: Optional[str], timeout_s: float = 15.0) -> None:
    """Fail now, with the URL tried, when the endpoint cannot be reached or refuses the key (GET /models)."""
    url = base_url.rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers=_headers(key), timeout=timeout_s)
    except httpx.HTTPError as e:
        raise JudgeError(f"the judge endpoint is unreachable: GET {url} failed ({type(e).__name__}: {e}). Check "
                         "judge.base_url, or use judge=none to keep the answers and judge them later") from None
    if r.status_code in (401, 403):
        raise JudgeError(f"the judge endpoint refused the API key: GET {url} -> {r.status_code}")
    if r.status_code >= 500:
        raise JudgeError(f"the judge endpoint is failing: GET {url} -> {r.status_code}")


@dataclass
class Client:
    base_url: str
    model: str
    key: Optional[str] = None
    temperature: float = 0.0
    max_tokens: int = 2048
    retries: int = 6
    backoff_s: float = 2.0
    timeout_s: float = 600.0

    @classmethod
    def for_judge(cls, judge: dict, base_url: str, model: str) -> "Client":
        return cls(base_url=base_url, model=model, key=api_key(judge), temperature=judge["temperature"],
                   max_tokens=judge["max_tokens"], retries=judge["retries"], backoff_s=judge["backoff_s"],
                   timeout_s=judge["timeout_s"])

    def chat(self, messages: list[dict], extra: Optional[dict] = None, http: Optional[httpx.Client] = None) -> str:
        """The judge's reply to one chat (FastChat: n=1, temperature 0, max_tokens 2048); `extra` adds to the
        request body (vLLM's structured_outputs)."""
        url = self.base_url.rstrip("/") + "/chat/completions"
        body = {"model": self.model, "messages": messages, "n": 1, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **(extra or {})}
        own = http is None
        http = http or httpx.Client(timeout=self.timeout_s)
        try:
            for attempt in range(self.retries + 1):
                text, why = self._attempt(http, url, body)
                if text is not None:
                    return text
                if attempt == self.retries:
                    raise JudgeError(f"the judge at {url} failed {self.retries + 1} times; last: {why}")
                wait = min(MAX_WAIT_S, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
                print(f"[qllm] judge: {why}; retry {attempt + 1}/{self.retries} in {wait:.1f} s", flush=True)
                time.sleep(wait)
        finally:
            if own:
                http.close()
        raise AssertionError("unreachable")

    def _attempt(self, http: httpx.Client, url: str, body: dict) -> tuple[Optional[str], str]:
        """(the reply text, "") or (None, why) for a failure worth retrying; raises on a refusal."""
        try:
            r = http.post(url, json=body, headers=_headers(self.key), timeout=self.timeout_s)
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"
        if r.status_code in RETRIED_STATUS:
            return None, f"HTTP {r.status_code}"
        if r.status_code != 200:
            raise JudgeError(f"the judge at {url} refused the request: HTTP {r.status_code}: {r.text[:500]}")
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"a reply that is not a chat completion: {r.text[:200]!r}"
        return content or "", ""
