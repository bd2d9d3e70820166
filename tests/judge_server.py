"""A real HTTP server on 127.0.0.1 that answers like an OpenAI/Anthropic endpoint, for judge tests."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudgeServer:
    """A real HTTP server; ``respond(path, body, headers) -> (status, headers, body)`` is set per test."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.respond = lambda path, body, headers: (500, {}, "no responder set")
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "headers": headers})
                status, extra_headers, payload = server.respond(self.path, body, headers)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in extra_headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def calls(self) -> int:
        return len(self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def openai_reply(content: str, top: list[tuple[str, float]] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"}
    if top is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": content,
                    "logprob": math.log(top[0][1]),
                    "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top],
                }
            ]
        }
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [choice],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
    }
