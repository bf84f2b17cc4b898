"""A chat with a rule: ask a question, and ask a follow-up only if the answer mentions a keyword.

    python examples/chat_with_rules.py                              # the embedded model, in this process
    python examples/chat_with_rules.py --url http://127.0.0.1:30000  # a running server (scripts/serve.py)
"""

from __future__ import annotations

import argparse

from jaxradix.lang import Backend, ProgramState, assistant, connect, function, gen, system, user

# CPU-sized settings for the in-process engine
ENGINE_KWARGS = dict(max_running_requests=16, max_total_tokens=16384, context_length=2048, log_level="warning")


@function
def chat_with_rules(s: ProgramState, question: str, keyword: str, follow_up: str, max_tokens: int,
                    system_prompt: str | None = None) -> bool:
    if system_prompt:  # without one, the chat template's default system message is written, as in the chat API
        s += system(system_prompt)
    s += user(question)
    s += assistant(gen("answer", max_tokens=max_tokens))
    if keyword.lower() not in s["answer"].lower():  # plain Python control flow on a generated value
        return False
    with s.user():
        s += follow_up
    with s.assistant():
        s += gen("follow_up", max_tokens=max_tokens)
    return True


def main(argv: list[str] | None = None, backend: Backend | None = None) -> ProgramState:
    p = argparse.ArgumentParser(description="Ask a follow-up only if the answer contains a keyword.")
    p.add_argument("--url", help="a jaxradix server (default: the embedded model in this process)")
    p.add_argument("--api-key")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--keyword", default="Paris")
    p.add_argument("--follow-up", default="Name one famous museum in that city.")
    p.add_argument("--system", default=None, help="a system prompt (default: the chat template's own)")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    be = backend or (connect(args.url, args.api_key) if args.url else connect(**ENGINE_KWARGS))
    try:
        state = chat_with_rules.run(question=args.question, keyword=args.keyword, follow_up=args.follow_up,
                                    max_tokens=args.max_tokens, system_prompt=args.system, temperature=0,
                                    backend=be)
    finally:
        if backend is None:
            be.close()
    for m in state.messages():
        print(f"{m['role']:>9}: {m['content']}")
    print(f"-- follow-up asked: {state.ret_value} (keyword {args.keyword!r})")
    return state


if __name__ == "__main__":
    main()
