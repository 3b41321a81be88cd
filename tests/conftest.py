"""Shared fixtures: the default model and small PEFT adapters built on it."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

# One torch thread per process: the suite starts server and executor processes beside the
# test process on a 2-core machine, and oversubscribed OpenMP threads were measured to make
# small-op workloads 5-10x slower (docs/engine.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# A suite started as a background job of a non-interactive shell (`(make test &)` in a script)
# inherits SIGINT ignored, as would every child process it starts: the Ctrl-C tests' children
# then ignored their Ctrl-C (three tests failed so in this session's runs, which were started
# that way). The tests run with SIGINT as a terminal has it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test, whatever the process had: the quantizer tests' small
    matrices spend more on synchronising threads than on the work on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from inlaid.models.prepare import prepare_default_model

    return prepare_default_model(quiet=True)


def make_peft_adapter(model, out_dir: Path, rank: int, targets: list[str], seed: int, alpha: float | None = None,
                      use_rslora: bool = False) -> Path:
    """A random LoRA adapter with non-zero B (so it changes outputs), saved in PEFT format."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=targets,
        init_lora_weights=False,
        use_rslora=use_rslora,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    # PEFT's non-default init is large for a 135M model; shrink it so outputs stay text-like
    # but clearly differ from the base.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.3)
    peft_model.save_pretrained(str(out_dir))
    peft_model.unload()
    return out_dir


@pytest.fixture(scope="session")
def hf_model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, model_dir) -> dict[str, Path]:
    """Three adapters of different ranks and target-module sets."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "attn-r8": (8, ["q_proj", "v_proj"], 1, False),
        "mlp-r16": (16, ["gate_proj", "up_proj", "down_proj"], 2, False),
        "all-r32": (32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 3, True),
    }
    dirs = {}
    for name, (rank, targets, seed, rslora) in specs.items():
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        dirs[name] = make_peft_adapter(base, root / name, rank, targets, seed, use_rslora=rslora)
    return dirs


@pytest.fixture(scope="session")
def greedy_logits():
    """greedy_logits(engine, prompt_ids, adapters, max_tokens, ignore_eos=True, forced=None) ->
    per prompt, the float32 logits row the runner computed for each generated token, decoding
    greedily step by step. `forced` (per prompt, a token list) feeds those tokens back instead
    of the argmax (teacher forcing, e.g. on a reference's output): prompt i then runs
    len(forced[i]) steps and its rows score that continuation."""
    import torch

    from inlaid.engine import SamplingParams
    from inlaid.protocol import SampledToken, StepResult

    def run(engine, prompt_ids: list[list[int]], adapters: list[str | None], max_tokens: int,
            ignore_eos: bool = True, forced: list[list[int]] | None = None) -> list[list[torch.Tensor]]:
        lengths = [len(tokens) for tokens in forced] if forced is not None else [max_tokens] * len(prompt_ids)
        request_ids = [engine.add_request(p, sampling=SamplingParams(max_tokens=n, ignore_eos=ignore_eos), adapter=a)
                       for p, a, n in zip(prompt_ids, adapters, lengths)]
        index_of = {engine.sequence(rid).seq_id: i for i, rid in enumerate(request_ids)}
        rows: list[list[torch.Tensor]] = [[] for _ in prompt_ids]

        def next_token(seq_id: int, row: torch.Tensor) -> int:
            index = index_of[seq_id]
            return int(row.argmax()) if forced is None else forced[index][len(rows[index]) - 1]

        while engine.has_unfinished():
            plan = engine.begin_step()
            seq_ids, logits, _ = engine.runner.forward_logits(plan)
            for seq_id, row in zip(seq_ids, logits):
                rows[index_of[seq_id]].append(row)
            engine.finish_step(StepResult(step_id=plan.step_id, num_tokens=0, compute_seconds=0.0, sampled=[
                SampledToken(seq_id=s, token_id=next_token(s, row)) for s, row in zip(seq_ids, logits)]))
        return rows

    return run


@pytest.fixture(scope="session")
def serving_reference(model_dir, adapter_dirs) -> dict:
    """The in-process engine's greedy answers shared by the server fuzz and fault tests."""
    from serving_helpers import compute_reference

    return compute_reference(model_dir, adapter_dirs)


@pytest.fixture
def server_log() -> Iterator[list[logging.LogRecord]]:
    """What the server's loggers say (`inlaid` and below: the coordinator's, the predictor's),
    through a handler of this fixture's own: `inlaid serve`'s logging set-up stops `inlaid`
    from propagating to pytest's capture."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("inlaid")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)
