"""`inlaid generate`: quick generation with the in-process engine.

    inlaid generate --prompt "Hello" --chat
    inlaid generate --adapter fr=adapters/trans-fr --prompt "..." --use fr
    inlaid generate --batch requests.jsonl     # lines: {"prompt"|"messages", "adapter", "max_tokens", ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from inlaid.protocol import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--quantized", help="a GPTQ checkpoint written by `inlaid quantize`")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each --prompt as a user chat message")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="register a PEFT adapter")
    parser.add_argument("--use", action="append", default=[], metavar="NAME",
                        help="adapter for the i-th --prompt ('-' for none); the last one repeats")
    parser.add_argument("--batch", type=Path, help="JSONL file of requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dense base weights and lm_head (bfloat16: faster CPU decode, float32 activations)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result")


def _requests(args: argparse.Namespace) -> list[dict]:
    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    requests: list[dict] = []
    for index, prompt in enumerate(args.prompt):
        adapter = (args.use[min(index, len(args.use) - 1)] if args.use else "-")
        request = {"adapter": None if adapter == "-" else adapter, **defaults}
        request["messages" if args.chat else "prompt"] = (
            [{"role": "user", "content": prompt}] if args.chat else prompt
        )
        requests.append(request)
    if args.batch:
        for line_number, line in enumerate(args.batch.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{args.batch}:{line_number}: not JSON: {error}")
            requests.append({**defaults, **item})
    if not requests:
        raise SystemExit("nothing to generate: give --prompt or --batch")
    return requests


def run(args: argparse.Namespace) -> int:
    from inlaid.engine import Engine, EngineConfig, InvalidRequestError
    from inlaid.models.prepare import prepare_default_model

    # A bad model, adapter or batch file raises here; `inlaid.cli.main` prints it in one line.
    model_dir = args.model or str(prepare_default_model(quiet=True))
    engine = Engine.local(EngineConfig(model_dir=model_dir, quantized_dir=args.quantized, device=args.device,
                                       weight_dtype=args.weight_dtype))
    for item in args.adapter:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--adapter expects NAME=DIR, got {item!r}")
        engine.register_adapter(name, path)
    requests = _requests(args)
    ids = []
    try:
        for request in requests:
            fields = {k: request[k] for k in ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop") if k in request}
            ids.append(engine.add_request(request.get("prompt"), messages=request.get("messages"),
                                          sampling=SamplingParams(**fields), adapter=request.get("adapter")))
    except (InvalidRequestError, TypeError) as error:
        print(f"inlaid generate: {error}", file=sys.stderr)
        return 2
    texts = {rid: [] for rid in ids}
    reasons: dict[str, str] = {}
    errors: dict[str, str] = {}
    from tqdm import tqdm

    started, generated = time.perf_counter(), 0
    # Tokens as they come, on a terminal only (disable=None): a long generation is not silent.
    bar = tqdm(desc="generate", unit="tok", disable=None, leave=False)
    while engine.has_unfinished():
        for output in engine.step():
            texts[output.request_id].append(output.text_delta)
            generated += len(output.new_token_ids)
            bar.update(len(output.new_token_ids))
            if output.finished:
                reasons[output.request_id] = output.finish_reason or ""
                if output.error is not None:
                    errors[output.request_id] = output.error.message
    bar.close()
    elapsed = time.perf_counter() - started
    for rid, request in zip(ids, requests):
        text = "".join(texts[rid])
        if args.json:
            print(json.dumps({"adapter": request.get("adapter"), "text": text, "finish_reason": reasons[rid],
                              **({"error": errors[rid]} if rid in errors else {})}))
        else:
            print(f"--- [{request.get('adapter') or 'base'}] ({reasons[rid]})\n{text}")
        if rid in errors:
            print(f"inlaid generate: [{request.get('adapter') or 'base'}] failed: {errors[rid]}", file=sys.stderr)
    print(f"{generated} tokens in {elapsed:.2f}s = {generated / elapsed:.1f} tokens/s", file=sys.stderr)
    return 1 if errors else 0
