"""The engine serves the checkpoints `inlaid quantize` writes with default options (4-bit,
group 128: K = 576 holds 4.5 groups, the last one 64 rows) on the default model.

Reference: transformers + PEFT on the dequantized weights of the same checkpoint, float32,
on a mixed batch (three adapters of ranks 8/16/32, one rsLoRA, and the bare base). The
exact kernel ("dense", float32) must give the reference's greedy tokens and logits to float32
rounding; the serving kernel (torch's int4 CPU kernel: bf16 activations inside) must keep
logits within INT4_LOGIT_TOLERANCE (INT4_MEAN_TOLERANCE on average) and every greedy token
whose reference top-2 logit gap exceeds CLEAR_GAP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inlaid.engine import Engine, EngineConfig

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village near the mountains, there lived",
    "List three colours:",
]
ADAPTERS = ["attn-r8", None, "all-r32", "mlp-r16", "all-r32", "attn-r8"]
NEW_TOKENS = 16
# int4 kernel vs the float32 reference, measured on this batch (81 positions): max |logit
# difference| over the vocabulary 0.10-0.67 per step, mean 0.04-0.08, on the reference's top
# token at most 0.36, over logits up to ~39 in magnitude: bf16 rounding of the activations
# inside the kernel (and of the scales/zeros it stores). Every greedy token was equal, down to
# top-2 gaps of 0.01; the test holds the tokens equal wherever the gap exceeds CLEAR_GAP,
# about 3x the largest error seen on a top token (the random test adapters make flat
# distributions: 44-60% of the positions are that clear, by CPU); at the other positions the
# token picked must be within CLEAR_GAP of the reference's top logit.
INT4_LOGIT_TOLERANCE = 1.0
INT4_MEAN_TOLERANCE = 0.15
CLEAR_GAP = 1.0


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory, model_dir) -> Path:
    """`inlaid quantize` with its default method and format (MLGPTQ, 4-bit, group 128,
    asymmetric, no act-order) on one committed task, calibrated on 2 samples of 64 tokens so
    that it takes seconds; the per-task Hessians the engine never reads are not stored."""
    from inlaid.cli import main

    out = tmp_path_factory.mktemp("quantized") / "default"
    task = f"math={REPO / 'adapters' / 'math'}:{REPO / 'inlaid' / 'tasks' / 'data' / 'math' / 'calib.jsonl'}"
    argv = ["quantize", "--model", str(model_dir), "--task", task, "--max-samples", "2", "--max-tokens", "64",
            "--no-hessian-state", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "inlaid_quant.json").read_text())["method"] == "mlgptq"
    return out


@pytest.fixture(scope="module")
def dequantized_peft(default_checkpoint, adapter_dirs):
    """transformers' Llama on the checkpoint's dequantized float32 weights, all adapters loaded."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from inlaid.quant.checkpoint import dequantized_state_dict, load_gptq_checkpoint

    raw = json.loads((default_checkpoint / "config.json").read_text())
    raw.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig(**raw)).eval()
    missing, unexpected = model.load_state_dict(dequantized_state_dict(load_gptq_checkpoint(default_checkpoint)),
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    names = list(adapter_dirs)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return peft_model.eval()


@pytest.fixture(scope="module")
def reference_generation(dequantized_peft, model_dir):
    """Greedy tokens (through the first end-of-sequence) and their logits per prompt of the
    mixed batch, from transformers + PEFT."""
    from inlaid.engine.config import ModelConfig
    from inlaid.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    pad, width = 2, max(len(p) for p in prompt_ids)
    with torch.no_grad():
        out = dequantized_peft.generate(
            input_ids=torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids]),
            attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]),
            adapter_names=[a if a is not None else "__base__" for a in ADAPTERS],
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad,
            return_dict_in_generate=True, output_logits=True,
        )
    eos = set(ModelConfig.from_dir(model_dir).eos_token_ids)
    logits = torch.stack(out.logits, dim=1).float()
    tokens, rows = [], []
    for index, generated in enumerate(out.sequences[:, width:].tolist()):
        cut = next((i + 1 for i, token in enumerate(generated) if token in eos), len(generated))
        tokens.append(generated[:cut])
        rows.append(logits[index, :cut])
    return prompt_ids, tokens, rows


def _engine(model_dir, checkpoint, adapter_dirs, **overrides) -> Engine:
    engine = Engine.local(EngineConfig(model_dir=str(model_dir), quantized_dir=str(checkpoint), dtype="float32",
                                       max_lora_slots=3, max_lora_rank=32, num_kv_blocks=64, **overrides))
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, str(path))
    return engine


@pytest.fixture(scope="module")
def served_engine(default_checkpoint, model_dir, adapter_dirs) -> Engine:
    """The serving configuration: the auto kernel (int4 on the CPU)."""
    return _engine(model_dir, default_checkpoint, adapter_dirs)


def test_default_checkpoint_has_groups_that_do_not_tile_k(default_checkpoint, served_engine):
    from inlaid.quant.checkpoint import load_gptq_checkpoint

    config = json.loads((default_checkpoint / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"], config["desc_act"]) == ("gptq", 4, 128, False)
    q_proj = load_gptq_checkpoint(default_checkpoint).linears["model.layers.0.self_attn.q_proj"]
    assert q_proj.in_features == 576 and q_proj.scales.shape == (5, 576)  # ceil(576 / 128) groups
    (qkv,) = served_engine.runner.model.layers[0].self_attn.qkv_proj.quantized  # q|k|v fused along N
    assert qkv.kind == "int4" and qkv.layout.kernel_group == 64 and qkv.layout.pad == 0
    (down,) = served_engine.runner.model.layers[0].mlp.down_proj.quantized
    assert down.kind == "int4" and down.layout.kernel_group == 128  # K = 1536 = 12 x 128


def test_generate_cli_serves_the_checkpoint_with_a_mix_of_adapters(default_checkpoint, model_dir, adapter_dirs,
                                                                   capsys):
    from inlaid.cli import main

    argv = ["generate", "--model", str(model_dir), "--quantized", str(default_checkpoint), "--json",
            "--max-tokens", "6", "--temperature", "0"]
    for name, path in adapter_dirs.items():
        argv += ["--adapter", f"{name}={path}"]
    uses = ["attn-r8", "-", "mlp-r16", "all-r32"]
    for prompt, use in zip(PROMPTS, uses):
        argv += ["--prompt", prompt, "--use", use]
    assert main(argv) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapter"] for r in results] == [None if u == "-" else u for u in uses]
    assert all(r["finish_reason"] in ("length", "stop") for r in results)
    # six tokens decode to text (an immediate end-of-sequence, "stop", may leave none)
    assert all(r["text"] for r in results if r["finish_reason"] == "length") and any(r["text"] for r in results)


def test_exact_kernel_equals_transformers_peft_on_the_dequantized_weights(
        default_checkpoint, model_dir, adapter_dirs, reference_generation, greedy_logits):
    prompt_ids, ref_tokens, ref_logits = reference_generation
    engine = _engine(model_dir, default_checkpoint, adapter_dirs, quant_kernel="dense")
    ours = greedy_logits(engine, prompt_ids, ADAPTERS, NEW_TOKENS, ignore_eos=False)
    for index, rows in enumerate(ours):
        logits = torch.stack(rows)
        assert logits.argmax(-1).tolist() == ref_tokens[index], f"prompt {index} ({ADAPTERS[index]})"
        assert (logits - ref_logits[index]).abs().max().item() < 1e-3
    assert len({tuple(t[:6]) for t in ref_tokens}) >= 5  # the adapters really change the outputs
    assert sum(len(t) for t in ref_tokens) >= 3 * NEW_TOKENS


def test_int4_kernel_parity_with_transformers_peft(served_engine, reference_generation, greedy_logits):
    """The serving path (auto kernel = int4 on the CPU) fed the reference's tokens (teacher
    forcing, so one flipped near-tie cannot derail the rest of the sequence)."""
    prompt_ids, ref_tokens, ref_logits = reference_generation
    ours = greedy_logits(served_engine, prompt_ids, ADAPTERS, NEW_TOKENS, forced=ref_tokens)
    clear, worst = 0, 0.0
    for index, rows in enumerate(ours):
        logits, reference = torch.stack(rows), ref_logits[index]
        worst = max(worst, (logits - reference).abs().max().item())
        assert (logits - reference).abs().mean().item() < INT4_MEAN_TOLERANCE, f"prompt {index}"
        top2 = reference.topk(2, dim=-1).values
        is_clear = (top2[:, 0] - top2[:, 1]) > CLEAR_GAP
        assert torch.equal(logits.argmax(-1)[is_clear], reference.argmax(-1)[is_clear]), f"prompt {index}"
        # Elsewhere a different pick may only be a near-tie of the reference's top token.
        picked = reference.gather(1, logits.argmax(-1, keepdim=True))[:, 0]
        assert torch.all(picked >= top2[:, 0] - CLEAR_GAP), f"prompt {index}"
        clear += int(is_clear.sum())
    assert worst < INT4_LOGIT_TOLERANCE, worst
    # The share of clear positions depends on the CPU that built the checkpoint (60 % on an
    # AMD EPYC, 44 % on an Intel Xeon with AMX): the exact check must still cover many.
    assert clear >= 0.3 * sum(len(t) for t in ref_tokens)


def test_batch_invariant_engine_gives_a_prompt_the_same_logits_whatever_shares_its_steps(
        default_checkpoint, model_dir, adapter_dirs, greedy_logits):
    """EngineConfig.batch_invariant: a short prompt alone, beside a long one (one prefill step of
    ~80 rows: the bf16 route's size by default), beside a long one of its own adapter (its
    adapter's rows then 32 or more: they took the LoRA matmul route, not the native kernel's,
    and a soak saw greedy answers flip), and chunked by a 24-token budget, gets the same
    logits bit for bit; so does the long prompt, alone in one prefill step and chunked by that
    budget beside the short one (torch's attention of a fresh prompt and of a continued chunk
    sum in other orders: its logits moved by up to 0.4). tests/test_batch_invariant.py checks
    the kernels' routes themselves."""
    from inlaid.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    short, long = tokenizer.encode(PROMPTS[0]), tokenizer.encode(" ".join(PROMPTS) * 2)
    assert len(short) < 8 and len(long) > 70
    runs, long_runs = [], []
    for budget, prompts, adapters in ((2048, [short], ["attn-r8"]), (2048, [short, long], ["attn-r8", "all-r32"]),
                                      (2048, [short, long], ["attn-r8", "attn-r8"]),
                                      (24, [long, short], ["mlp-r16", "attn-r8"]), (2048, [long], ["mlp-r16"])):
        engine = _engine(model_dir, default_checkpoint, adapter_dirs, batch_invariant=True,
                         max_num_batched_tokens=budget)
        rows = greedy_logits(engine, prompts, adapters, 6)
        if short in prompts:
            runs.append(torch.stack(rows[prompts.index(short)]))
        if long in prompts and adapters[prompts.index(long)] == "mlp-r16":
            long_runs.append(torch.stack(rows[prompts.index(long)]))
    assert all(torch.equal(run, runs[0]) for run in runs[1:]), [(run - runs[0]).abs().max().item() for run in runs]
    assert len(long_runs) == 2 and torch.equal(long_runs[0], long_runs[1]), (long_runs[0] - long_runs[1]).abs().max()


def test_teacher_forced_nll_equals_transformers_peft(default_checkpoint, model_dir, adapter_dirs, dequantized_peft):
    """inlaid.engine.scoring on the quantized base (exact and int4 kernels) against the
    NLL transformers + PEFT computes on the dequantized weights."""
    from inlaid.engine.runner import ModelRunner
    from inlaid.engine.scoring import ScoreRequest, ScoringError, score_continuations
    from inlaid.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)
    texts = [("Translate to French: good morning", " Bonjour, comment allez-vous aujourd'hui ?", "all-r32"),
             ("2 + 2 =", " 4, and 3 + 3 = 6.", None),
             ("The river flows", " to the sea because water runs downhill.", "attn-r8")]
    requests = []
    for prompt, answer, adapter in texts:
        prompt_ids, full = tokenizer.encode(prompt), tokenizer.encode(prompt + answer)
        assert full[: len(prompt_ids)] == prompt_ids
        requests.append(ScoreRequest(full, len(prompt_ids), None if adapter is None else (adapter, str(adapter_dirs[adapter]))))
    reference = []
    for request in requests:
        name = request.adapter[0] if request.adapter else "__base__"
        with torch.no_grad():
            logits = dequantized_peft(input_ids=torch.tensor([request.token_ids]), adapter_names=[name]).logits[0]
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        targets = torch.tensor(request.token_ids[request.first_scored:])
        reference.append(-log_probs[request.first_scored - 1 : -1].gather(1, targets[:, None]).sum().item())
    # nats per answer token; int4 measured up to 0.032 (its logits move by ~0.1, see above)
    for kernel, tolerance in (("dense", 1e-3), ("int4", 0.08)):
        config = EngineConfig(model_dir=str(model_dir), quantized_dir=str(default_checkpoint), dtype="float32",
                              quant_kernel=kernel, max_lora_slots=2, max_lora_rank=32, num_kv_blocks=8)
        # max_batch_tokens 24: the three requests go in two steps, one of them mixing adapters
        scores = score_continuations(ModelRunner(config), requests, max_batch_tokens=24)
        for score, request, want in zip(scores, requests, reference):
            assert score.tokens == len(request.token_ids) - request.first_scored
            assert abs(score.mean_nll - want / score.tokens) < tolerance, (kernel, score.mean_nll, want / score.tokens)
    with pytest.raises(ScoringError, match="first_scored"):
        score_continuations(ModelRunner(config), [ScoreRequest([1, 2, 3], 3)])


def test_memory_accounting_counts_what_the_executor_holds(served_engine, hf_model):
    """inlaid.engine.memory against sizes computed from the config, and against the
    parameter counts of the transformers model."""
    from inlaid.engine.memory import base_sizes, engine_memory

    runner, config = served_engine.runner, served_engine.config
    mc = runner.model_config
    hidden, inter, kv_out, layers = mc.hidden_size, mc.intermediate_size, mc.num_kv_heads * mc.head_dim, mc.num_layers
    sizes = base_sizes(runner)
    linears = sum(p.numel() for n, p in hf_model.named_parameters() if n.endswith("proj.weight"))
    assert sizes.projection_params == linears
    assert sizes.embedding_params == hf_model.model.embed_tokens.weight.numel()
    assert sizes.other_params == sum(p.numel() for n, p in hf_model.named_parameters() if "norm" in n)

    with torch.inference_mode():
        runner.model.logits(torch.zeros(1, hidden))  # the head's packed copy is made on first use
    memory = engine_memory(runner)
    slots, rank = config.max_lora_slots, config.max_lora_rank
    # (K, output widths of the slices) of each LoraLinear; pools are float32 [S, n * R, K] + [S, R, N_i]
    projections = [(hidden, [hidden, kv_out, kv_out]), (hidden, [hidden]), (hidden, [inter, inter]), (inter, [hidden])]
    # ... and, where the native LoRA kernel reads float16 adapters from them, float16 copies of
    # both (2 bytes an entry) and a one-byte flag per slot
    halves = any(module.half_pools is not None for module in runner.model.modules() if hasattr(module, "half_pools"))
    entry_bytes = 4 + 2 * halves
    pools = sum(entry_bytes * slots * rank * (len(widths) * k + sum(widths)) + 8 * len(widths) * slots + halves * slots
                for k, widths in projections)
    assert memory.lora_pools == layers * pools
    assert memory.lora_half_copies == halves * layers * sum(2 * slots * rank * (len(widths) * k + sum(widths)) + slots
                                                            for k, widths in projections)
    assert memory.kv_cache == layers * 2 * config.num_kv_blocks * config.block_size * kv_out * 4
    # int4 layout: half a byte per weight, bf16 (scale, zero) per kernel group and column
    int4 = 0
    for k, widths in projections:
        group = 64 if k == 576 else 128
        int4 += k * sum(widths) // 2 + (k // group) * sum(widths) * 2 * 2
    assert memory.projections == layers * int4
    head_copies = 2 if runner.model.packed_head is not None else 1  # packed for oneDNN beside the embedding
    assert memory.embedding_and_head == head_copies * 4 * sizes.embedding_params
    assert memory.other_weights == 4 * sizes.other_params
