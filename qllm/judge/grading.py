"""The judgments a cell's answers need, each cached as soon as the judge returns it.

Single grading: every (question, turn) of the answers, FastChat's prompt for its category and turn. Pairwise: every
(question, turn) against the baseline's answers, asked twice, the evaluated model's answer shown first (order "AB")
and second ("BA"): FastChat's game 1 and game 2.

A judgment's cache key hashes the judge's identity and the exact chat sent (prompt template, question, reference,
answers, order): changing anything the verdict depends on asks again; re-running after an interruption (or a judge
outage past its retries) asks only what is missing. Each verdict is its own file, written whole (temp + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..cell import digest
from ..tasks import mt_bench

EVALUATED, BASELINE = "model_1", "model_2"  # FastChat's names in pairwise results
# judge.constrain_verdict: what a verdict must look like (vLLM structured outputs), after <= 1000 characters
VERDICT_REGEX = {"single": r"[^\[\]]{0,1000}Rating: \[\[(10|[1-9])\]\]", "pair": r"[^\[\]]{0,1000}\[\[[ABC]\]\]"}


@dataclass
class Judgment:
    kind: str  # single | pair
    question_id: int
    category: str
    turn: int  # 1 or 2
    prompt: str  # the judge prompt's name (single-v1, pair-math-v1-multi-turn, ...)
    messages: list[dict] = field(repr=False)
    order: str = ""  # pair: "AB" (the evaluated model's answer is A) or "BA"

    def key(self, judge_key: str) -> str:
        return digest({"judge": judge_key, "prompt": self.prompt, "messages": self.messages})


def single_judgments(qs: list[dict], answers: dict[int, list[str]], prompts: dict[str, dict],
                     refs: dict[int, list[str]]) -> list[Judgment]:
    out = []
    for q in qs:
        for turn in range(1, len(q["turns"]) + 1):
            name = mt_bench.judge_prompt_name(q["category"], turn, pairwise=False)
            ref = refs.get(q["question_id"]) if q["category"] in mt_bench.NEED_REF_CATS else None
            msgs = mt_bench.single_messages(prompts[name], q, answers[q["question_id"]], turn, ref)
            out.append(Judgment("single", q["question_id"], q["category"], turn, name, msgs))
    return out


def pair_judgments(qs: list[dict], answers: dict[int, list[str]], baseline: dict[int, list[str]],
                   prompts: dict[str, dict], refs: dict[int, list[str]]) -> list[Judgment]:
    out = []
    for q in qs:
        a, b = answers[q["question_id"]], baseline[q["question_id"]]
        ref = refs.get(q["question_id"]) if q["category"] in mt_bench.NEED_REF_CATS else None
        for turn in range(1, len(q["turns"]) + 1):
            name = mt_bench.judge_prompt_name(q["category"], turn, pairwise=True)
            for order, (x, y) in (("AB", (a, b)), ("BA", (b, a))):
                msgs = mt_bench.pair_messages(prompts[name], q, x, y, turn, ref)
                out.append(Judgment("pair", q["question_id"], q["category"], turn, name, msgs, order))
    return out


def verdict(j: Judgment, text: str) -> dict:
    """The record of one judgment: the judge's text and what FastChat reads from it. Pairwise winners are mapped
    to model_1 (the evaluated cell) / model_2 (the baseline) / tie / error, as in FastChat's play_a_match_pair."""
    rec = {k: v for k, v in asdict(j).items() if k != "messages"} | {"judgment": text}
    if j.kind == "single":
        rec["score"] = mt_bench.parse_rating(text)
    else:
        raw = mt_bench.parse_winner(text)
        first, second = (EVALUATED, BASELINE) if j.order == "AB" else (BASELINE, EVALUATED)
        rec["winner"] = {"A": first, "B": second}.get(raw, raw)
    return rec


def _path(store: Path, key: str) -> Path:
    return store / key[:2] / f"{key}.json"


def load_cached(js: list[Judgment], store: Path, judge_key: str) -> dict[int, dict]:
    """index in `js` -> its record, for the judgments whose verdict is cached (the record is rebuilt from the stored
    text: two judgments can send the same chat, e.g. both orders of a match whose two answers are equal)."""
    out = {}
    for i, j in enumerate(js):
        f = _path(store, j.key(judge_key))
        if f.is_file():
            try:
                out[i] = verdict(j, json.loads(f.read_text())["judgment"])
            except (ValueError, KeyError):  # not whole (cannot happen with rename; a foreign write): ask again
                continue
    return out


def _save(store: Path, key: str, record: dict) -> None:
    f = _path(store, key)
    f.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.tmp-", dir=f.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, f)


def constraint(j: Judgment, constrain: bool) -> Optional[dict]:
    """The request's structured-output constraint (judge.constrain_verdict), or None."""
    return {"structured_outputs": {"regex": VERDICT_REGEX[j.kind]}} if constrain else None


def run(js: list[Judgment], ask: Callable[[Judgment], str], store: Path, judge_key: str, concurrency: int,
        progress_every_s: float = 10.0) -> dict[int, dict]:
    """Ask the judge each different chat in `js` once (at most `concurrency` in flight), saving each verdict as it
    comes; index in `js` -> record. The first failure (past the client's retries) stops the rest: what finished is
    kept."""
    by_key: dict[str, list[int]] = {}
    for i, j in enumerate(js):
        by_key.setdefault(j.key(judge_key), []).append(i)
    done: dict[int, dict] = {}
    lock = threading.Lock()
    t0 = last = time.monotonic()

    def one(key: str, same: list[int]) -> None:
        nonlocal last
        text = ask(js[same[0]])
        _save(store, key, verdict(js[same[0]], text))
        with lock:
            done.update({i: verdict(js[i], text) for i in same})
            now = time.monotonic()
            if now - last >= progress_every_s or len(done) == len(js):
                last = now
                print(f"[qllm] judge: {len(done)}/{len(js)} judgments ({now - t0:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="qllm-judge") as pool:
        futures = [pool.submit(one, key, same) for key, same in by_key.items()]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed: Optional[BaseException] = next((f.exception() for f in finished if f.exception()), None)
        if failed is not None:
            for f in futures:
                f.cancel()
            raise failed
    return done
