"""Serve a model over HTTP (OpenAI-compatible and SGLang-native APIs).

    python scripts/serve.py                                  # the embedded SmolLM2-135M-Instruct
    python scripts/serve.py --model-path /path/to/hf_dir --port 30000 --api-key KEY --enable-metrics
    python scripts/serve.py --help                           # every flag (SGLang's names)
"""

from jaxradix.launch_server import main

if __name__ == "__main__":
    main()
