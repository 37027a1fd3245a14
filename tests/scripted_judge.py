"""A scripted OpenAI-compatible judge: a real HTTP server on 127.0.0.1 (`POST /v1/chat/completions`,
`GET /v1/models`) whose replies come from a rule over the chat it receives. It records every request (the chat and
the Authorization header) so tests can count what was asked, check retries and see which key was sent."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Union

# a rule answers a chat with the judge's text, or an HTTP status to fail with
Rule = Callable[[list[dict]], Union[str, int]]


@dataclass
class ScriptedJudge:
    rule: Rule
    delay_s: float = 0.0  # per chat request: lets a test interrupt judging midway
    requests: list[dict] = field(default_factory=list)
    authorizations: list[Optional[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                judge.authorizations.append(self.headers.get("Authorization"))
                self._reply(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.authorizations.append(self.headers.get("Authorization"))
                judge.requests.append(body)
                if judge.delay_s:
                    time.sleep(judge.delay_s)
                answer = judge.rule(body["messages"])
                if isinstance(answer, int):
                    self._reply(answer, {"error": {"message": f"scripted {answer}"}})
                    return
                self._reply(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": answer}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def user_text(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")
