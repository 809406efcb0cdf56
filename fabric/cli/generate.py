"""CLI commands for using models: generate, chat, embed, deploy, deployments, undeploy.

Every command is a thin layer over ``fabric.Fabric``: the SDK does the checking and the work,
these functions only parse arguments and print. Text goes to stdout; status, spinners and stats
go to stderr so that ``fabric generate ... > out.txt`` captures exactly the model's output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fabric.cli.common import (
    fetch_listing,
    hook_arg,
    model_args,
    open_fabric,
    parse_hooks,
    plain,
    print_table,
    site_arg,
)
from fabric.errors import FabricError

if TYPE_CHECKING:
    from fabric.client.fabric import Fabric
    from fabric.protocol import Hook

__all__ = ["register"]

def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands to the ``fabric`` parser."""
    raw = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "generate", help="complete a prompt, streaming the text as it is produced",
        description="Complete PROMPT with a model at the site; text is streamed to stdout.",
        epilog='examples:\n  fabric generate "The mitochondria is" --max-tokens 24\n'
               '  echo "Tell me a joke" | fabric generate - --temperature 0.8 --seed 1\n'
               '  fabric generate "Q: 2+2?" --stop "\\n" --json\n'
               '  fabric generate "I think the movie was" --hook \'{"kind": "steer", "layer": 10, '
               '"vector_file": "v.npy", "scale": 4.0}\'',
        formatter_class=raw)
    p.add_argument("prompt", metavar="PROMPT", help='the prompt text ("-" reads stdin)')
    model_args(p, default="smollm2-135m")
    _sampling_args(p)
    hook_arg(p)
    p.add_argument("--json", action="store_true",
                   help="wait for the whole result and print it as JSON (no streaming)")
    p.add_argument("--stats", action="store_true",
                   help="print token counts, timings and the model's sha256 to stderr")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "chat", help="interactive multi-turn chat (type /exit to leave)",
        description="Chat with a model using its chat template. The conversation is kept "
                    "between turns. Commands: /exit (or Ctrl-D) leaves, /reset forgets the "
                    "history. Lines can also be piped in, one user turn per line.",
        epilog="examples:\n  fabric chat\n  fabric chat --system 'Answer in one sentence.'",
        formatter_class=raw)
    model_args(p, default="smollm2-135m")
    _sampling_args(p, max_tokens=256)
    hook_arg(p)
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the chat")
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "embed", help="embedding vectors of texts",
        description="Embed each TEXT with an embedding model (mean pooling, L2-normalised).",
        epilog='examples:\n  fabric embed "a cat" "a dog"\n  fabric embed "a cat" --json',
        formatter_class=raw)
    p.add_argument("texts", metavar="TEXT", nargs="+", help="texts to embed")
    model_args(p, default="minilm-l6")
    p.add_argument("--pooling", choices=["mean", "first", "last"], default="mean",
                   help="how token vectors become one vector (default: mean)")
    p.add_argument("--layer", type=int, default=-1,
                   help="which layer's output to pool (default: -1, the last)")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise")
    hook_arg(p)
    p.add_argument("--json", action="store_true", help="print full vectors as JSON")
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser(
        "deploy", help="launch (pre-warm) a model server with a parallel plan",
        description="Launch a deployment of MODEL as a batch job with PP pipeline stages x TP "
                    "tensor-parallel ranks, overriding the site's default plan, and wait until "
                    "it is ready (a spinner shows queue position and loading).",
        epilog="examples:\n  fabric deploy smollm2-135m\n"
               "  fabric deploy smollm2-135m --pp 2 --site local-slurm --no-wait",
        formatter_class=raw)
    p.add_argument("model", metavar="MODEL", help="catalog name (see fabric models)")
    p.add_argument("--pp", type=int, help="pipeline-parallel stages (default: the site's plan)")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks per stage (default: site's)")
    p.add_argument("--ep", type=int, help="expert-parallel groups per stage, for mixtures of "
                   "experts (must divide --tp; default: site's)")
    p.add_argument("--version", help="pin a model version")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    p.add_argument("--json", action="store_true", help="print the deployment record as JSON")
    site_arg(p)
    p.set_defaults(func=cmd_deploy)

    p = subparsers.add_parser(
        "deployments", help="list model-server deployments at the site",
        description="List deployments with plan, batch job id, state, address and idle time.")
    site_arg(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_deployments)

    p = subparsers.add_parser(
        "undeploy", help="drain and stop a deployment",
        description="Drain deployment ID (running requests finish) and stop its batch job.")
    p.add_argument("deployment_id", metavar="ID", help="deployment id (see fabric deployments)")
    site_arg(p)
    p.set_defaults(func=cmd_undeploy)


# -- argument groups ----------------------------------------------------------------------------

def _sampling_args(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=max_tokens,
                   help=f"most tokens to generate (default: {max_tokens})")
    g.add_argument("-t", "--temperature", type=float, default=0.0,
                   help="0 is greedy (default); higher is more random")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    g.add_argument("--seed", type=int, help="same seed, same output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable)")
    g.add_argument("--timeout", type=float, help="deadline for the request, in seconds")


def _sampling(args: argparse.Namespace, hooks: list[Hook] | None) -> dict[str, Any]:
    return {
        "model": args.model, "version": args.version, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "seed": args.seed, "stop": _unescape(args.stop), "timeout": args.timeout,
        "hooks": hooks,
    }


def _unescape(stops: Sequence[str]) -> list[str]:
    # A shell makes typing a newline awkward; accept the usual escapes ("\n", "\t").
    # unicode_escape reads bytes as Latin-1: give it Latin-1 (the rest as \u escapes), not
    # UTF-8, whose bytes it would turn into other letters ("ß" into "Ã\x9f").
    return [s.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s
            else s for s in stops]


# -- commands -----------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    """``fabric generate``: stream a completion to stdout."""
    from fabric.cli.progress import StatusSpinner

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    request = _sampling(args, parse_hooks(args.hook))
    with StatusSpinner(f"waiting for {args.model}") as spinner, open_fabric(args, spinner) as fab:
        if args.json:
            result = fab.generate(prompt, **request)
            spinner.stop()
            # Capture hooks put torch tensors in `captures`: print them as nested lists.
            print(result.model_dump_json(indent=2, fallback=plain))
            return 0
        with fab.stream(prompt, **request) as stream:
            for chunk in stream:
                spinner.stop()
                sys.stdout.write(chunk)
                sys.stdout.flush()
        spinner.stop()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stream.result is not None:
            _print_captures(stream.result.captures)
        if args.stats and stream.result is not None:
            _print_stats(stream.result)
    return 0


def _print_captures(captures: dict[str, Any]) -> None:
    # Streamed text has no room for arrays; say what was captured and how to get the values.
    for layer, value in captures.items():
        shape = "x".join(str(n) for n in getattr(value, "shape", ()))
        print(f"captured hidden state {layer}: {shape} (--json prints the values)",
              file=sys.stderr)


def _print_stats(result: Any) -> None:
    t, u, m = result.timings, result.usage, result.model
    print(f"[{m.name} {m.version} sha256:{m.sha256[:12]}] finish={result.finish_reason} "
          f"prompt={u.prompt_tokens} completion={u.completion_tokens} tokens; "
          f"queue {t.queue_s:.3f}s prefill {t.prefill_s:.3f}s decode {t.decode_s:.3f}s",
          file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    """``fabric chat``: a read-eval-print loop that keeps the conversation."""

    hooks = parse_hooks(args.hook)
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    system_turns = len(history)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (gives input() line editing and history)
        print(f"chatting with {args.model} at site {args.site}; /exit to leave, "
              "/reset to forget the conversation", file=sys.stderr)
    with open_fabric(args) as fab:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                del history[system_turns:]
                print("(conversation forgotten)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            try:
                reply = _chat_turn(fab, history, args, hooks, interactive)
            except FabricError as exc:
                history.pop()  # forget the failed turn so the conversation stays usable
                if not interactive:
                    raise
                print(f"\nerror: {exc.message}", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": reply})
    return 0


def _chat_turn(fab: Fabric, history: list[dict[str, str]], args: argparse.Namespace,
               hooks: list[Hook] | None, interactive: bool) -> str:
    from fabric.cli.progress import StatusSpinner

    if interactive:
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
    spinner = StatusSpinner(f"waiting for {args.model}")
    fab.on_status = spinner.update  # a fresh spinner per turn: the last one was stopped
    with spinner, fab.stream(messages=list(history), **_sampling(args, hooks)) as stream:
        for chunk in stream:
            spinner.stop()
            sys.stdout.write(chunk)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.result.text if stream.result is not None else stream.text


def cmd_embed(args: argparse.Namespace) -> int:
    """``fabric embed``: print one vector per text."""
    from fabric.cli.progress import StatusSpinner

    hooks = parse_hooks(args.hook)
    with StatusSpinner(f"waiting for {args.model}") as spinner, open_fabric(args, spinner) as fab:
        vectors = fab.embed(list(args.texts), model=args.model, version=args.version,
                            layer=args.layer, pooling=args.pooling,
                            normalize=not args.no_normalize, hooks=hooks)
        spinner.stop()
    if args.json:
        out = [{"text": t, "embedding": [float(x) for x in v]}
               for t, v in zip(args.texts, vectors, strict=True)]
        print(json.dumps({"model": args.model, "embeddings": out}))
        return 0
    for text, vec in zip(args.texts, vectors, strict=True):
        head = ", ".join(f"{float(x):+.4f}" for x in vec[:4])
        tail = f"{float(vec[-1]):+.4f}"
        print(f"dim={len(vec)} [{head}, ..., {tail}]  {text}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """``fabric deploy``: launch a deployment and wait for it with a spinner."""
    from fabric.cli.progress import StatusSpinner

    with StatusSpinner(f"deploying {args.model}") as spinner, open_fabric(args, spinner) as fab:
        record = fab.deploy(args.model, pp=args.pp, tp=args.tp, version=args.version,
                            wait=not args.no_wait, timeout=args.timeout, ep=args.ep)
        spinner.stop()
    if args.json:
        print(json.dumps(record, indent=2, default=str))
        return 0
    print(f"deployment {record.get('id', record.get('deployment_id', '?'))}: "
          f"{record.get('model', args.model)} {_plan(record.get('plan'))} "
          f"{record.get('state', '?')}"
          + (f" at {record['address']}" if record.get("address") else "")
          + (f" (job {record['job_id']})" if record.get("job_id") else ""))
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    """``fabric deployments``: list the site's deployments."""
    records = fetch_listing(args, "deployments")
    if records is None:
        return 0
    rows = [[
        str(r.get("id", r.get("deployment_id", ""))), str(r.get("model", "")),
        _plan(r.get("plan")), str(r.get("job_id") or ""), str(r.get("state", "")),
        str(r.get("address") or ""), _seconds(r.get("idle_s")),
    ] for r in records]
    if not rows:
        print("no deployments", file=sys.stderr)
        return 0
    print_table(["ID", "MODEL", "PLAN", "JOB", "STATE", "ADDRESS", "IDLE"], rows)
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    """``fabric undeploy``: drain and stop one deployment."""
    with open_fabric(args) as fab:
        record = fab.undeploy(args.deployment_id)
    print(f"deployment {args.deployment_id}: {record.get('state', 'stopping')}")
    return 0


# -- formatting ---------------------------------------------------------------------------------

def _plan(plan: Any) -> str:
    if not isinstance(plan, dict):
        return ""
    ep = plan.get("ep", 1)
    return f"pp={plan.get('pp', 1)} tp={plan.get('tp', 1)}" + (f" ep={ep}" if ep != 1 else "")


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value:.0f}s" if value < 120 else f"{value / 60:.0f}m"
