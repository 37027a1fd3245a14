"""The local judge server, started as the judge stage starts it: `transformers serve` (the fallback without a vLLM
environment; `vllm serve` runs in tests/e2e/test_mt_bench.py) on a tiny model, one chat through the client, and
nothing left running afterwards."""

from __future__ import annotations

from omegaconf import OmegaConf

from qllm.judge import planning, server
from qllm.judge.client import Client
from qllm.planning import compose_cell, compose_config
from qllm.stages.runner import free_port


def test_transformers_serve_answers_and_is_ended(tmp_path, cache_dir, data_dir):
    import psutil

    from qllm.sources.models import prepare

    tiny = compose_cell(["model=tiny-random-llama", "method=none", f"data_dir={data_dir}", f"cache_dir={cache_dir}"])
    path = prepare(tiny.model, tiny.data_dir, tiny.cache_dir)
    cfg = OmegaConf.to_container(compose_config(["judge=local", f"judge.model={path}", "judge.server=transformers",
                                                 "judge.startup_timeout_s=300"]), resolve=True)
    judge = planning.plan(cfg["judge"], {}, str(data_dir))
    assert judge["server"] == "transformers" and judge["server_version"] == "5.17.0" and judge["content"]
    before = {p.pid for p in psutil.process_iter()}
    with server.serving(judge, free_port(), tmp_path / "server.log") as (url, model):
        assert model == judge["model"]
        reply = Client(url, model, max_tokens=4, retries=0).chat([{"role": "user", "content": "Rate: [[?]]"}])
        assert isinstance(reply, str)
        started = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                   and "serve" in " ".join(p.info["cmdline"] or [])]
        assert started
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
