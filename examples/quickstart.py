"""Quick start: one completion, then the same prompt streamed token by token.

    python examples/quickstart.py                      # SmolLM2 on the local site
    python examples/quickstart.py --prompt "Water boils at" --max-tokens 32

The first call starts the local site and a SmolLM2 model server (a few seconds; the SDK prints
what it is waiting for on stderr); later calls reuse the warm server.
"""

from __future__ import annotations

import argparse
import json
import sys

from fabric import Fabric


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="local", help="site name or definition folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="The mitochondria is")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = parser.parse_args(argv)

    with Fabric(site=args.site) as fab:
        result = fab.generate(args.prompt, model=args.model, max_tokens=args.max_tokens)
        print(f"generate: {args.prompt}{result.text}")
        print(f"  {len(result.token_ids)} tokens, finish={result.finish_reason}, "
              f"model={result.model.name}@{result.model.version} "
              f"({result.timings.total_s:.2f} s at the server)")

        print("stream:   " + args.prompt, end="", flush=True)
        chunks = []
        with fab.stream(args.prompt, model=args.model, max_tokens=args.max_tokens) as stream:
            for chunk in stream:
                chunks.append(chunk)
                print(chunk, end="", flush=True)
        print()
        streamed = "".join(chunks)
        print(f"  streamed text equals generate: {streamed == result.text}")

    if args.json:
        print(json.dumps({"example": "quickstart", "text": result.text,
                          "tokens": len(result.token_ids), "streamed": streamed,
                          "same": streamed == result.text}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
