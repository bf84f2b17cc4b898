"""Tree of thought with fork: several lines of reasoning from one shared prefix, each judged by
select, and the best one continued to an answer.

The question's text is computed once (fork sends it first), and every branch reuses its KV pages
from the radix cache: see the cached_tokens printed per branch.

    python examples/tree_of_thought.py
    python examples/tree_of_thought.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

from jaxradix.lang import Backend, ProgramState, connect, function, gen, select

ENGINE_KWARGS = dict(max_running_requests=16, max_total_tokens=16384, context_length=2048, log_level="warning")
APPROACHES = ["Think about the numbers first.", "Think about a simple example.", "Think about the units."]


@function
def tree_of_thought(s: ProgramState, question: str, max_tokens: int) -> int:
    s += ("You are a careful problem solver. Below, a question is followed by one line of reasoning "
          "and a judgement of whether that reasoning is sound.\n\n")
    s += f"Question: {question}\n"
    branches = s.fork(len(APPROACHES))  # runs in parallel from here on
    branches += lambda i: f"Approach: {APPROACHES[i]}\nReasoning:"
    branches += gen("thought", max_tokens=max_tokens, stop="\n")
    branches += "\nIs this reasoning sound? Answer:" + select("sound", [" yes", " no"])
    branches.join()  # s["thought"], s["sound"]: one entry per branch
    scores = [m["normalized_prompt_logprobs"][0] for m in s.get_meta_info("sound")]
    best = max(range(len(APPROACHES)), key=lambda i: scores[i])
    s += f"Approach: {APPROACHES[best]}\nReasoning:{s['thought'][best]}\nTherefore, the final answer is"
    s += gen("answer", max_tokens=max_tokens, stop="\n")
    return best


def main(argv: list[str] | None = None, backend: Backend | None = None) -> ProgramState:
    p = argparse.ArgumentParser(description="Tree of thought with fork and select.")
    p.add_argument("--url", help="a jaxradix server (default: the embedded model in this process)")
    p.add_argument("--api-key")
    p.add_argument("--question", default="A train travels 60 km in 30 minutes. What is its speed in km/h?")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)
    be = backend or (connect(args.url, args.api_key) if args.url else connect(**ENGINE_KWARGS))
    try:
        state = tree_of_thought.run(question=args.question, max_tokens=args.max_tokens, temperature=0, backend=be)
    finally:
        if backend is None:
            be.close()
    for i, (thought, meta) in enumerate(zip(state["thought"], state.get_meta_info("thought"), strict=True)):
        print(f"branch {i} ({APPROACHES[i]}) cached {meta['cached_tokens']}/{meta['prompt_tokens']} prompt tokens; "
              f"sound:{state['sound'][i]}\n   {thought.strip()}")
    print(f"best branch: {state.ret_value}\nanswer: {state['answer'].strip()}")
    return state


if __name__ == "__main__":
    main()
