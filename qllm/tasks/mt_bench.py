"""MT-Bench as FastChat's llm_judge runs it (fastchat/llm_judge, snapshot 0e6d3e4): the 80 two-turn questions, the
answers of the evaluated model, the judge prompt of each (category, turn), and the parsing of verdicts.

- answers (`gen_model_answer.py`): turn 2's prompt holds the model's own turn-1 answer; the model's chat template;
  temperature per category (`temperature_config`, 0.7 for a category it does not list), greedy below 1e-4;
  `max_new_token` 1024 (`task.max_new_tokens`, a cap for CPU runs);
- single grading (`gen_judgment.py --mode single`): math, reasoning and coding (`NEED_REF_CATS`) are judged with
  `single-math-v1` and the GPT-4 reference answer, the others with `single-v1`; turn 2 with the `-multi-turn`
  prompts, which show the whole dialogue; the rating is `[[n]]`, else `[n]`, else -1 (kept, never scored);
- pairwise (`pair-v2`, `pair-math-v1` and their `-multi-turn` forms): `[[A]]`, `[[B]]`, `[[C]]` (tie), else "error".

Pure functions over plain dicts, apart from `generate_answers` (which drives the backend's lm-eval LM).
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path
from typing import Any, Optional

NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
OTHER_TEMPERATURE = 0.7  # a category temperature_config does not list
GREEDY_BELOW = 1e-4
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
UNPARSED = -1  # a rating that could not be read from the verdict
PAIR_VERDICTS = {"[[A]]": "A", "[[B]]": "B", "[[C]]": "tie"}


# ---- data ----


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def questions(data_dir: str, settings: dict, limit: Optional[int] = None) -> list[dict]:
    """The benchmark's questions, `limit` of them as `pick` takes them."""
    return pick(read_jsonl(Path(data_dir) / settings["questions"]), limit)


def pick(qs: list[dict], limit: Optional[int]) -> list[dict]:
    """`limit` questions taken round robin over the categories in file order (limit 8 covers each of the 8
    categories once), so a small run still sees every kind of question and judge prompt; the file's order is kept."""
    if limit is None or limit >= len(qs):
        return qs
    by_cat: dict[str, list[dict]] = {}
    for q in qs:
        by_cat.setdefault(q["category"], []).append(q)
    picked: list[dict] = []
    rank = 0
    while len(picked) < limit:
        for cat_qs in by_cat.values():
            if rank < len(cat_qs) and len(picked) < limit:
                picked.append(cat_qs[rank])
        rank += 1
    ids = {q["question_id"] for q in picked}
    return [q for q in qs if q["question_id"] in ids]


def references(data_dir: str, settings: dict) -> dict[int, list[str]]:
    """question_id -> the reference answer's turns (GPT-4's, for the categories judged against a reference)."""
    return {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(Path(data_dir) / settings["references"])}


def judge_prompts(data_dir: str, settings: dict) -> dict[str, dict]:
    return {p["name"]: p for p in read_jsonl(Path(data_dir) / settings["judge_prompts"])}


# ---- answering ----


def temperature(category: str, table: Optional[dict] = None) -> float:
    table = TEMPERATURE if table is None else table
    return float(table.get(category, OTHER_TEMPERATURE))


def gen_kwargs(category: str, max_new_tokens: int, table: Optional[dict] = None) -> dict:
    """lm-eval generation kwargs of one answer: sampling at the category's temperature, greedy below 1e-4; no stop
    string but the model's end of turn (lm-eval adds the EOS token)."""
    t = temperature(category, table)
    sample = t >= GREEDY_BELOW
    return {"until": [], "max_gen_toks": int(max_new_tokens), "do_sample": sample, "temperature": t if sample else 0.0}


def conversation(question: dict, answers: list[str]) -> list[dict]:
    """The chat so far when the model answers turn len(answers)+1: every earlier turn with the model's own answer."""
    messages = []
    for i, user in enumerate(question["turns"][: len(answers) + 1]):
        messages.append({"role": "user", "content": user})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def generate_answers(lm: Any, qs: list[dict], max_new_tokens: int, model_id: str, seed: int,
                     table: Optional[dict] = None) -> list[dict]:
    """Both turns of every question through the backend's LM (its chat template, its batching), turn by turn:
    turn 2's prompts are built from turn 1's answers. Records in FastChat's model_answer format."""
    import torch
    from lm_eval.api.instance import Instance

    answers: dict[int, list[str]] = {q["question_id"]: [] for q in qs}
    n_turns = max(len(q["turns"]) for q in qs)
    for turn in range(n_turns):
        todo = [q for q in qs if len(q["turns"]) > turn]
        requests = [Instance(request_type="generate_until", doc=q, idx=0,
                             arguments=(lm.apply_chat_template(conversation(q, answers[q["question_id"]])),
                                        gen_kwargs(q["category"], max_new_tokens, table)))
                    for q in todo]
        torch.manual_seed(seed + turn)
        print(f"[qllm] evaluate: mt_bench: turn {turn + 1} of {len(todo)} questions ...", flush=True)
        for q, out in zip(todo, lm.generate_until(requests)):
            answers[q["question_id"]].append(out.strip())
    now = time.time()
    return [{"question_id": q["question_id"], "category": q["category"], "answer_id": f"{model_id}-{q['question_id']}",
             "model_id": model_id, "choices": [{"index": 0, "turns": answers[q["question_id"]]}], "tstamp": now}
            for q in qs]


# ---- judging ----


def judge_prompt_name(category: str, turn: int, pairwise: bool) -> str:
    """The judge prompt FastChat uses for a question of `category` at `turn` (1 or 2)."""
    ref = category in NEED_REF_CATS
    base = ("pair-math-v1" if ref else "pair-v2") if pairwise else ("single-math-v1" if ref else "single-v1")
    return base + ("-multi-turn" if turn == 2 else "")


def _ref_kwargs(reference: Optional[list[str]], turn: int) -> dict:
    if reference is None:
        return {}
    return {"ref_answer_1": reference[0], **({"ref_answer_2": reference[1]} if turn == 2 else {})}


def single_messages(prompt: dict, question: dict, answer: list[str], turn: int,
                    reference: Optional[list[str]]) -> list[dict]:
    """The judge's chat for grading one answer (`run_judge_single`): the prompt's system message, then the filled
    template."""
    kw = _ref_kwargs(reference, turn)
    if turn == 2:
        user = prompt["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                answer_1=answer[0], answer_2=answer[1], **kw)
    else:
        user = prompt["prompt_template"].format(question=question["turns"][0], answer=answer[0], **kw)
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def pair_messages(prompt: dict, question: dict, answer_a: list[str], answer_b: list[str], turn: int,
                  reference: Optional[list[str]]) -> list[dict]:
    """The judge's chat for comparing two answers, A shown first (`run_judge_pair`)."""
    kw = _ref_kwargs(reference, turn)
    if turn == 2:
        user = prompt["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                answer_a_1=answer_a[0], answer_b_1=answer_b[0],
                                                answer_a_2=answer_a[1], answer_b_2=answer_b[1], **kw)
    else:
        user = prompt["prompt_template"].format(question=question["turns"][0], answer_a=answer_a[0],
                                                answer_b=answer_b[0], **kw)
    return [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(judgment: str) -> float:
    """FastChat's rule: the first `[[n]]`, else the first `[n]`, else -1 (unparsed)."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not match:
        return UNPARSED
    return float(ast.literal_eval(match.groups()[0]))


def parse_winner(judgment: str) -> str:
    """FastChat's rule for `[[A]]`-format prompts, in its order: A, then B, then C (tie), else "error"."""
    for mark, verdict in PAIR_VERDICTS.items():
        if mark in judgment:
            return verdict
    return "error"


# ---- the evaluate stage's runner (conf/task/mt_bench.yaml: `runner: py:qllm.tasks.mt_bench.run`) ----


def run(lm: Any, entry: dict, *, data_dir: str, seed: int, model_id: str, out_dir: Path, key: str) -> Any:
    """Answer the entry's questions with the backend's LM; the answers go to `answers_<key>.jsonl` (cached with the
    task: judging them is a later step, whose judge never enters this task's key)."""
    from ..records import TaskResult

    t = time.perf_counter()
    settings = entry["settings"]
    everything = questions(data_dir, settings)
    qs = pick(everything, entry.get("limit"))
    records = generate_answers(lm, qs, entry.get("max_gen_toks") or 1024, model_id, seed,
                               settings.get("temperature"))
    write_jsonl(out_dir / f"answers_{key}.jsonl", records)
    return TaskResult(lm_eval_task="mt_bench", n_samples={"effective": len(qs), "original": len(everything)},
                      num_fewshot=0, primary={"metric": entry["metric"], "value": None},
                      wall_s=round(time.perf_counter() - t, 2))
