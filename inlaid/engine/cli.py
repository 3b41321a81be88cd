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
from typing import Any

import msgspec

from inlaid.cli_args import model_dir_problem
from inlaid.engine.chat import template_messages
from inlaid.protocol import SamplingParams
from inlaid.protocol.client import ChatMessage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--quantized", help="a GPTQ checkpoint written by `inlaid quantize`")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each --prompt as a user chat message")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="register a PEFT adapter")
    parser.add_argument("--use", action="append", default=[], metavar="NAME",
                        help="adapter for the i-th --prompt ('-' for none); the last one repeats for the "
                             "prompts after it; at most one per --prompt (a --batch line names its own 'adapter')")
    parser.add_argument("--batch", type=Path, help="JSONL file of requests (- reads them from standard input)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dense base weights and lm_head (bfloat16: faster CPU decode, float32 activations)")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="with --quantized on the CPU: one kernel route for every row, so each answer is the "
                             "same whatever it is batched with (a server with [executor] batch_invariant = true "
                             "gives the same answers); prompt steps of many rows are slower")
    parser.add_argument("--special-tokens-in-text", choices=["control", "text"], default="control",
                        help="\"<|im_end|>\" typed into a prompt is the control token (control, the default) or "
                             "its characters (text), as the server's [executor] special_tokens_in_text")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result")


class _InputError(Exception):
    """A bad argument or batch line: `run` prints it as one `inlaid generate: ...` line, exit 2."""


# What a `--batch` line may hold besides SamplingParams' fields; anything else is refused by
# name (as the server refuses an unknown field) instead of vanishing into "give exactly one
# of a prompt or chat messages".
_REQUEST_FIELDS = ("prompt", "messages", "adapter")


def _adapters(items: list[str]) -> dict[str, str]:
    """`--adapter NAME=DIR` options as {name: dir}, each checked as the server would check it,
    before the model loads: a name the server refuses or one given twice (the last silently
    won) is an error, and so is a directory that is not a PEFT LoRA adapter."""
    from inlaid.engine.adapter_config import AdapterError, read_adapter_spec
    from inlaid.serve.config import ConfigError, check_task_name

    adapters: dict[str, str] = {}
    for item in items:
        name, _, path = item.partition("=")
        if not path:
            raise _InputError(f"--adapter expects NAME=DIR, got {item!r}")
        try:
            check_task_name(name)  # the server's rule, so a name that works here works there
            read_adapter_spec(name, path)  # torch-free: config and weight files, not tensors
        except (ConfigError, AdapterError) as error:
            raise _InputError(f"--adapter: {error}") from None
        if name in adapters:
            raise _InputError(f"--adapter {name!r} given twice ({adapters[name]} and {path})")
        adapters[name] = path
    return adapters


def _sampling(fields: dict[str, Any], where: str) -> SamplingParams:
    """SamplingParams from plain values, or _InputError naming `where` and the field: msgspec's
    strict conversion names the field of a wrong type or an unknown one ("- at `$.stop`"),
    where SamplingParams(**fields) let "5" through to a raw "'<' not supported" later."""
    try:
        sampling = msgspec.convert(fields, SamplingParams)
        sampling.validate()
    except (msgspec.ValidationError, ValueError) as error:
        raise _InputError(f"{where}: {error}") from None
    return sampling


def _batch_request(item: object, where: str, defaults: dict[str, Any], vocab: int | None) -> dict[str, Any]:
    """One `--batch` line as a request, every field checked here (not when the engine, loaded
    by then, trips over it with a Python TypeError); `vocab`: the model's vocabulary size,
    when its config could be read."""
    if not isinstance(item, dict):
        raise _InputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if unknown := sorted(set(item) - set(_REQUEST_FIELDS) - set(SamplingParams.__struct_fields__)):
        raise _InputError(f"{where}: unknown field {', '.join(map(repr, unknown))}; a line holds "
                          f"{', '.join(_REQUEST_FIELDS + SamplingParams.__struct_fields__)}")
    request = {key: item[key] for key in _REQUEST_FIELDS if key in item}
    prompt, messages, adapter = (request.get(key) for key in _REQUEST_FIELDS)
    if (prompt is None) == (messages is None):
        raise _InputError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if prompt is not None and not isinstance(prompt, str):
        try:  # the engine also takes token ids
            msgspec.convert(prompt, list[int])
        except msgspec.ValidationError:
            raise _InputError(f"{where}: field 'prompt' must be a string or a list of token ids") from None
        # Refused by the engine too, but after the model load and without the line's name.
        if any(not 0 <= t < (vocab or 2**63) for t in prompt):
            bound = f"[0, {vocab})" if vocab else "non-negative"
            raise _InputError(f"{where}: field 'prompt': token ids must be integers in {bound}")
    if messages is not None:
        try:
            msgspec.convert(messages, list[ChatMessage])
        except msgspec.ValidationError as error:
            raise _InputError(f"{where}: field 'messages': {error}") from None
        if not messages:
            raise _InputError(f"{where}: field 'messages' must be a non-empty list")
        try:  # the roles by the SDK's and the server's rule, refused here with the line's name
            template_messages(messages)
        except ValueError as error:
            raise _InputError(f"{where}: field 'messages': {error}") from None
    if adapter is not None and not isinstance(adapter, str):
        raise _InputError(f"{where}: field 'adapter' must be a string or null")
    rest = {key: value for key, value in item.items() if key not in _REQUEST_FIELDS}
    request["sampling"] = _sampling({**defaults, **rest}, where)
    request["max_tokens_from"] = f"{where}: max_tokens" if "max_tokens" in rest else "--max-tokens"
    return request


def _check_text_options(args: argparse.Namespace) -> None:
    """--prompt as UTF-8 and --use by count, known before the model loads."""
    for index, prompt in enumerate(args.prompt, 1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:
            # Bytes that are not UTF-8 in argv reach Python as surrogate escapes; the tokenizer
            # raised a TypeError traceback on them after the model had loaded.
            bad = prompt[error.start].encode("utf-8", "surrogateescape")
            which = f"--prompt {index}" if len(args.prompt) > 1 else "--prompt"
            raise _InputError(f"{which} is not valid UTF-8 (byte 0x{bad.hex()} at character {error.start})") from None
    # Each changed nothing without the other, silently (an outside probe).
    if args.chat and not args.prompt:
        raise _InputError("--chat wraps each --prompt as a user message; a --batch line is a chat turn when it has "
                          "'messages'")
    if args.batch_invariant and not args.quantized:
        raise _InputError("--batch-invariant chooses the kernel route of a --quantized base; without --quantized "
                          "it changes nothing")
    if args.use and not args.prompt:
        # It applied to --prompt only: with --batch alone it was ignored and the base ran.
        raise _InputError("--use picks the adapter of a --prompt; a --batch line names its adapter in "
                          "its 'adapter' field")
    if len(args.use) > len(args.prompt):
        # One --use per --prompt, in order: the extra ones were dropped silently.
        raise _InputError(f"{len(args.use)} --use for {len(args.prompt)} --prompt: give at most one --use "
                          "per --prompt, in the same order (the last one repeats)")


def _batch_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line; a line that is not UTF-8 is named by
    file:line (the whole file was refused as one undecodable read)."""
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as error:
        raise _InputError(f"--batch {path}: {error.strerror or error}") from None
    lines = []
    for line_number, data in enumerate(raw.split(b"\n"), 1):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _InputError(f"{path}:{line_number}: not valid UTF-8 (byte 0x{data[error.start]:02x} at "
                              f"byte {error.start} of the line)") from None
        if text.strip():
            lines.append((line_number, text))
    return lines


def _vocab_size(model_dir: Path) -> int | None:
    """The model's vocabulary size from its config.json (None if it cannot be read yet: the
    load reports that)."""
    from inlaid.engine.config import ModelConfig

    try:
        return int(ModelConfig.from_dir(model_dir).vocab_size)
    except Exception:  # noqa: BLE001 - any unreadable config is the model load's to report
        return None


def _requests(args: argparse.Namespace, model_dir: Path) -> list[dict[str, Any]]:
    """The requests to run, each with a checked `sampling`; _InputError for a bad one."""
    _check_text_options(args)
    defaults = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    sampling = _sampling(defaults, "options") if args.prompt else None
    requests: list[dict[str, Any]] = []
    for index, prompt in enumerate(args.prompt):
        adapter = (args.use[min(index, len(args.use) - 1)] if args.use else "-")
        request = {"adapter": None if adapter == "-" else adapter, "sampling": sampling,
                   "max_tokens_from": "--max-tokens", "where": "--prompt"}
        request["messages" if args.chat else "prompt"] = (
            [{"role": "user", "content": prompt}] if args.chat else prompt
        )
        requests.append(request)
    if args.batch:
        lines = _batch_lines(args.batch)
        if not lines and not requests:
            raise _InputError(f"--batch {args.batch} is empty: nothing to generate")
        vocab = _vocab_size(model_dir) if lines else None
        for line_number, line in lines:
            where = f"{args.batch}:{line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise _InputError(f"{where}: not JSON: {error}") from None
            requests.append({**_batch_request(item, where, defaults, vocab), "where": where})
    if not requests:
        raise _InputError("nothing to generate: give --prompt or --batch")
    return requests


def _check_adapters_used(requests: list[dict[str, Any]], adapters: dict[str, str]) -> None:
    # Known without the model: a request for an adapter no --adapter registers.
    for request in requests:
        if request.get("adapter") is not None and request["adapter"] not in adapters:
            raise _InputError(f"unknown adapter {request['adapter']!r} (--use or a --batch line); "
                              f"registered with --adapter: {sorted(adapters) or 'none'}")


def _check_inputs(args: argparse.Namespace) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Everything about the inputs that can be known without the model, so that a bad one
    costs a line, not a model load (or a traceback after it)."""
    if problem := model_dir_problem(args.model):
        raise _InputError(problem)
    from inlaid.engine.config import check_device

    try:  # as EngineConfig checks it, but named as the option ("device must be ..." named none)
        check_device("--device", args.device)
    except ValueError as error:
        raise _InputError(str(error)) from None
    if args.quantized:
        from inlaid.serve.config import ConfigError
        from inlaid.serve.config_parsing import check_quantized_dir

        try:
            # An adapter directory here failed deep in the loader ("unexpected tensor ...lora_A").
            # A float model folder was served unquantized, and a truncated weights file failed
            # after the model load in the library's words: both are known from the files.
            check_quantized_dir(args.quantized, float_hint="give the float model as --model")
        except ConfigError as error:
            # The message names the server's config key; here the option is what was given.
            raise _InputError(str(error).replace("model.quantized_dir", "--quantized", 1)) from None
    from inlaid.models.prepare import default_model_dir
    from inlaid.tasks.checks import adapter_problem, base_model_warnings

    model_dir = Path(args.model) if args.model else default_model_dir()
    adapters, requests = _adapters(args.adapter), _requests(args, model_dir)
    _check_adapters_used(requests, adapters)
    # The checks `eval` runs (its pools, as ours, sized to the adapters): wrong r, shapes of another
    # base, a truncated or NaN file were found only by the load after the model's.
    paths = {name: Path(path) for name, path in adapters.items()}
    if problem := adapter_problem(model_dir, paths):  # its pools are sized to its adapters, as eval's
        raise _InputError(f"--adapter: {problem}")
    # after the check: the warning says the adapter is served (it preceded a refusal)
    for warning in base_model_warnings(model_dir, paths):
        print(f"inlaid generate: warning: {warning}", file=sys.stderr)
    return adapters, requests


def _note_context_caps(max_model_len: int, requests: list[dict[str, Any]], prompts: list[list[int]]) -> None:
    """One stderr note per max_tokens the context cannot hold (`prompts`: each request's
    token ids): the engine stops a sequence when the context is full, so `--max-tokens
    100000000` ran for minutes and printed nothing to say that it would stop at the context.
    A note, not a refusal: "as many as fit" is a fair thing to ask for."""
    notes: list[str] = []
    for request, prompt in zip(requests, prompts):
        wanted = request["sampling"].max_tokens
        if wanted is None:
            continue
        if len(prompt) >= max_model_len:
            continue  # refused by the engine on its own: a note before the refusal misled
        leaves = max_model_len - len(prompt)
        note = (f"inlaid generate: note: {request['max_tokens_from']} {wanted} is more than the context leaves "
                f"({leaves}): generating at most {leaves}")
        if wanted > leaves and note not in notes:
            notes.append(note)
    for note in notes:
        print(note, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        adapters, requests = _check_inputs(args)
    except _InputError as error:
        print(f"inlaid generate: {error}", file=sys.stderr)
        return 2
    from inlaid.engine import Engine, EngineConfig, InvalidRequestError
    from inlaid.models.prepare import prepare_default_model

    # What passed the checks above can still fail to load; `inlaid.cli.main` prints that in one line.
    model_dir = args.model or str(prepare_default_model(quiet=True))
    from inlaid.tasks.generation import adapters_pool_rank

    # the pools at the adapters' largest rank (a rank-80 adapter eval served was refused here: a probe)
    max_rank = adapters_pool_rank(model_dir, adapters.values(), at_least=EngineConfig.max_lora_rank)
    engine = Engine.local(EngineConfig(model_dir=model_dir, quantized_dir=args.quantized, device=args.device,
                                       weight_dtype=args.weight_dtype, batch_invariant=args.batch_invariant,
                                       special_tokens_in_text=args.special_tokens_in_text, max_lora_rank=max_rank))
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    ids = []
    where = "--prompt"
    try:
        # Tokenized once (the chat template rendered once): the note and the engine use the ids.
        prompts = []
        for request in requests:
            where = request["where"]
            prompts.append(engine.prompt_tokens(request.get("prompt"), request.get("messages")))
        _note_context_caps(engine.max_model_len, requests, prompts)
        for request, prompt in zip(requests, prompts):
            where = request["where"]
            ids.append(engine.add_request(prompt, sampling=request["sampling"], adapter=request.get("adapter")))
    except InvalidRequestError as error:
        # Named by its batch line (or --prompt): "the prompt has 9000 tokens" alone left which one open.
        print(f"inlaid generate: {where}: {error}", file=sys.stderr)
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
