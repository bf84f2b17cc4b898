"""Few-shot extraction into a JSON schema: gen(json_schema=...) constrains decoding so the output
always parses and validates.

    python examples/few_shot_extraction.py
    python examples/few_shot_extraction.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import json

from jaxradix.lang import Backend, ProgramState, connect, function, gen

ENGINE_KWARGS = dict(max_running_requests=16, max_total_tokens=16384, context_length=2048, log_level="warning")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "city", "age"],
    "additionalProperties": False,
}

SHOTS = [
    ("Maria, 34, moved to Lisbon last year.", {"name": "Maria", "city": "Lisbon", "age": 34}),
    ("In Oslo lives Erik, who just turned 51.", {"name": "Erik", "city": "Oslo", "age": 51}),
    ("Aiko (27) works as a nurse in Osaka.", {"name": "Aiko", "city": "Osaka", "age": 27}),
]

TEXTS = [
    "Pierre is 45 years old and lives in Lyon.",
    "The 19-year-old student Lena studies in Vienna.",
]


@function
def extract(s: ProgramState, text: str) -> dict:
    s += "Extract the person's name, city and age from each text as JSON.\n\n"
    for shot, record in SHOTS:
        s += f"Text: {shot}\nJSON: {json.dumps(record)}\n\n"
    s += f"Text: {text}\nJSON: " + gen("record", max_tokens=48, json_schema=SCHEMA)
    return json.loads(s["record"])


def main(argv: list[str] | None = None, backend: Backend | None = None) -> list[ProgramState]:
    p = argparse.ArgumentParser(description="Few-shot extraction into a JSON schema.")
    p.add_argument("--url", help="a jaxradix server (default: the embedded model in this process)")
    p.add_argument("--api-key")
    p.add_argument("--text", action="append", help="a text to extract from (repeatable)")
    args = p.parse_args(argv)
    be = backend or (connect(args.url, args.api_key) if args.url else connect(**ENGINE_KWARGS))
    try:
        states = extract.run_batch([{"text": t} for t in args.text or TEXTS], temperature=0, backend=be)
    finally:
        if backend is None:
            be.close()
    for st in states:
        meta = st.get_meta_info("record")
        print(f"{st.ret_value}   (cached {meta['cached_tokens']}/{meta['prompt_tokens']} prompt tokens)")
    return states


if __name__ == "__main__":
    main()
