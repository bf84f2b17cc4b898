"""SGLang's real frontend (`import sglang`) against a jaxradix server, through a recording proxy.

Run by scripts/sglang_client_check.sh inside a scratch venv that has `sglang` (not jaxradix's venv).
Each program's requests (method, path, JSON body, answer status) go to RECORD/<program>.json, which
tests/test_sglang_client.py replays against the server in CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sglang as sgl

RECORDED: list[dict[str, Any]] = []
_lock = threading.Lock()


def start_proxy(upstream: str) -> str:
    """A 127.0.0.1 reverse proxy that forwards everything to upstream and records each request."""
    up = urllib.parse.urlparse(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes: streams pass through

        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            entry: dict[str, Any] = {"method": self.command, "path": self.path, "status": None,
                                     "body": json.loads(body) if body else None}
            with _lock:  # recorded on arrival: a client may not read the answer before its next call
                RECORDED.append(entry)
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            r = conn.getresponse()
            entry["status"] = r.status
            self.send_response(r.status)
            self.send_header("content-type", r.getheader("content-type", "application/json"))
            self.end_headers()
            while chunk := r.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
            conn.close()

        do_GET = do_POST = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


# == the programs ==================================================================================
@sgl.function
def capital(s, country):
    s += f"The capital of {country} is" + sgl.gen("answer", max_tokens=8, temperature=0, stop=".")


@sgl.function
def yes_no(s):
    s += "Question: Is the sky blue on a clear day?\nAnswer (yes or no): "
    s += sgl.select("answer", choices=["yes", "no"])


@sgl.function
def two_facts(s):
    s += "Here are two facts about the sea.\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=12, stop="\n", temperature=0)
    forks.join()
    s += "1." + forks[0]["fact"] + "\n2." + forks[1]["fact"] + "\n"


@sgl.function
def chat(s, question):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("reply", max_tokens=16, temperature=0))


@sgl.function
def number(s):
    s += "Pick a number between 1 and 100: "
    s += sgl.gen("n", regex=r"[1-9][0-9]?", max_tokens=4, temperature=0)
    s += "\nAn integer: " + sgl.gen("i", dtype=int, max_tokens=4, temperature=0)


@sgl.function
def story(s):
    s += "Once upon a time" + sgl.gen("rest", max_tokens=16, temperature=0)


@sgl.function
def logprobs(s):
    s += "The sky is" + sgl.gen("w", max_tokens=3, temperature=0, return_logprob=True, top_logprobs_num=2,
                                return_text_in_logprobs=True, logprob_start_len=0)


def run(name: str, fn: Any) -> None:
    t = time.perf_counter()
    before = len(RECORDED)
    result = fn()
    with _lock:
        mine = RECORDED[before:]
    print(f"[{name}] {time.perf_counter() - t:.1f}s, {len(mine)} requests -> {result!r}", flush=True)
    PROGRAMS[name] = mine


PROGRAMS: dict[str, list[dict[str, Any]]] = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--chat-template", default="chatml", help="SGLang's chat template name for role blocks")
    ap.add_argument("--record", default=None, help="folder for <program>.json request recordings")
    args = ap.parse_args()
    proxy = start_proxy(args.url)
    backends: list[Any] = []
    # SmolLM2 (the embedded model) speaks ChatML; SGLang cannot tell that from its model path
    run("connect", lambda: backends.append(sgl.RuntimeEndpoint(proxy, chat_template_name=args.chat_template))
        or backends[0].model_info["model_path"])
    backend = backends[0]
    sgl.set_default_backend(backend)
    print(f"sglang {sgl.__version__} frontend -> {args.url}")

    run("gen", lambda: capital.run(country="France")["answer"])
    run("select", lambda: yes_no.run()["answer"])
    run("fork", lambda: two_facts.run().text()[-120:])
    run("run_batch", lambda: [st["answer"] for st in capital.run_batch(
        [{"country": c} for c in ("Italy", "Spain", "Japan")], num_threads=3)])
    run("roles", lambda: chat.run(question="Say hello in one word.")["reply"])
    run("regex", lambda: (lambda st: (st["n"], st["i"]))(number.run()))
    run("streaming", lambda: "".join(story.run(stream=True).text_iter("rest")))
    run("logprobs", lambda: (lambda st: (st["w"], st.get_meta_info("w")["output_token_logprobs"][:2]))(
        logprobs.run()))
    run("server_info", lambda: sorted(backend.get_server_info())[:5])
    run("cache_prefix", lambda: backend.cache_prefix("A shared system prompt. "))
    run("flush_cache", lambda: backend.flush_cache())
    if args.record:
        os.makedirs(args.record, exist_ok=True)
        for name, reqs in PROGRAMS.items():
            with open(os.path.join(args.record, f"{name}.json"), "w") as f:
                json.dump(reqs, f, indent=1)
                f.write("\n")
        print(f"recorded {sum(map(len, PROGRAMS.values()))} requests into {args.record}")
    bad = [(n, r["path"], r["status"]) for n, reqs in PROGRAMS.items() for r in reqs if r["status"] != 200]
    print("all requests answered 200" if not bad else f"non-200 answers: {bad}")


if __name__ == "__main__":
    main()
