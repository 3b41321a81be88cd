"""The quantizer's fast paths against slow, independent references: batched GPTQ against
each problem alone and against brute-force OBS in float64, the one-trtri inverse factor
against the inverse computed in float64, the stacked per-task errors against ‖(W−Q)X‖²
measured on X itself, the blocked upper-triangle Gram against XᵀX in float64, and the
stage-by-stage layer pass against the decoder layer's own forward."""

from __future__ import annotations

import pytest
import torch

from inlaid.quant.aggregate import TaskHessian, TaskHessians
from inlaid.quant.gptq import gptq_quantize, gptq_quantize_many, inverse_cholesky
from inlaid.quant.hessian import HessianAccumulator, gram
from inlaid.quant.methods import parse_method, quantize_linear, quantize_linears
from inlaid.quant.spec import QuantSpec

from test_quant_gptq import _brute_force_obs, _correlated_inputs, _hessian64


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=3, group_size=-1, damp_percent=0.0, block_size=4),
        QuantSpec(bits=3, group_size=6, damp_percent=0.0, block_size=4),  # groups straddle blocks
        QuantSpec(bits=2, group_size=5, damp_percent=0.01, block_size=8),  # a ragged last group (13 = 5+5+3)
        QuantSpec(bits=3, group_size=4, damp_percent=0.0, block_size=5, act_order=True),
        QuantSpec(bits=4, group_size=4, damp_percent=0.0, block_size=5, act_order=True, static_groups=False),
    ],
    ids=["perchannel", "g6-straddle", "g5-ragged-damped", "actorder-static", "actorder-dynamic"],
)
def test_batched_gptq_equals_each_problem_alone_and_brute_force(spec: QuantSpec) -> None:
    cols = 13
    generator = torch.Generator().manual_seed(21)
    weights = [torch.randn(rows, cols, generator=generator, dtype=torch.float64) for rows in (7, 3, 5, 4)]
    hessians = [_hessian64(_correlated_inputs(200, cols, seed=seed, dtype=torch.float64)) for seed in (1, 2, 3)]
    hessians.append(hessians[0])  # the same Hessian object twice: factorized once
    batched = gptq_quantize_many(weights, hessians, spec)
    for weight, hessian, result in zip(weights, hessians, batched):
        alone = gptq_quantize(weight, hessian, spec)
        assert torch.equal(result.codes, alone.codes) and torch.equal(result.g_idx, alone.g_idx)
        assert torch.equal(result.scales, alone.scales) and torch.equal(result.zeros, alone.zeros)
        assert result.damp == alone.damp
        if spec.damp_percent == 0.0:
            damped = hessian
        else:
            damped = hessian + result.damp * torch.eye(cols, dtype=torch.float64)
        order = (torch.argsort(torch.diagonal(damped), descending=True, stable=True) if spec.act_order
                 else torch.arange(cols))
        expected_codes, expected_weight = _brute_force_obs(weight, damped, spec, order)
        assert torch.equal(result.codes.double(), expected_codes)
        torch.testing.assert_close(result.dequantize(torch.float64), expected_weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [40, 300])
def test_inverse_factor_is_the_upper_cholesky_factor_of_the_inverse(size: int) -> None:
    hessian64 = _hessian64(_correlated_inputs(4 * size, size, seed=size, dtype=torch.float64))
    live = torch.ones(size, dtype=torch.bool)
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        upper, damp = inverse_cholesky(hessian64.to(dtype), 0.01, live)
        assert torch.equal(upper, torch.triu(upper)) and bool((torch.diagonal(upper) > 0).all())
        expected = torch.linalg.inv(hessian64 + damp * torch.eye(size, dtype=torch.float64))
        reference = torch.linalg.cholesky(expected, upper=True)  # the factor, the slow way
        torch.testing.assert_close(upper.double(), reference, rtol=tolerance, atol=tolerance * float(reference.abs().max()))


def test_gram_and_blocked_accumulator_match_float64() -> None:
    for features in (48, 300):
        rows = _correlated_inputs(700, features, seed=features)
        expected = rows.double().T @ rows.double()
        torch.testing.assert_close(gram(rows).double(), expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
        accumulator = HessianAccumulator(features)
        for chunk in torch.split(rows, [100, 0, 250, 350]):
            accumulator.add(chunk)
        torch.testing.assert_close(accumulator.hessian.double(), 2.0 * expected / 700, rtol=1e-5,
                                   atol=2e-4 * float(expected.abs().max()) / 700)
        assert torch.equal(accumulator.hessian, accumulator.hessian.T)


def test_stacked_task_errors_match_the_error_measured_on_the_inputs() -> None:
    cols, rows = 96, 40
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(rows, cols, generator=generator)
    inputs = {f"t{seed}": _correlated_inputs(300 + 50 * seed, cols, seed=seed) * (1 + seed) for seed in range(4)}
    stats = {name: TaskHessian(_hessian64(x).float(), x.shape[0]) for name, x in inputs.items()}
    hessians = TaskHessians(stats)
    quantized = gptq_quantize(weight, hessians.combine({name: 1.0 for name in stats}), QuantSpec(bits=3, group_size=32))
    errors = hessians.errors(weight, quantized.dequantize())
    w, q = weight.double(), quantized.dequantize(torch.float64)
    for name, x in inputs.items():
        x = x.double().T
        expected = float(torch.linalg.norm((w - q) @ x) ** 2 / torch.linalg.norm(w @ x) ** 2)
        assert errors[name] == pytest.approx(expected, rel=1e-4)
    lam = {"t0": 0.1, "t1": 0.2, "t2": 0.3, "t3": 0.4}
    expected_sum = sum(stats[name].hessian.double() * value for name, value in lam.items())
    torch.testing.assert_close(hessians.combine(lam).double(), expected_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mlgptq", "minimax", "gptq-mean-lora", "gptq-task:t1", "rtn"])
def test_linears_of_one_input_batched_equal_one_by_one(method: str) -> None:
    cols = 64
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(rows, cols, generator=generator) for rows in (48, 16, 16)]
    stats = {f"t{seed}": TaskHessian(_hessian64(_correlated_inputs(256, cols, seed=seed)).float(), 256 + seed)
             for seed in range(3)}
    spec = QuantSpec(bits=3, group_size=32)
    parsed = parse_method(method, list(stats))
    together = quantize_linears(parsed, weights, stats, spec)
    for weight, outcome in zip(weights, together):
        alone = quantize_linear(parsed, weight, stats, spec)
        assert torch.equal(outcome.quantized.codes, alone.quantized.codes)
        assert outcome.task_weights == pytest.approx(alone.task_weights, rel=1e-12)


def test_layer_pass_stage_by_stage_is_the_layer_forward(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from inlaid.quant.model_io import STAGES, LayerInputs, LayerPass, capture_first_layer_inputs, run_layer

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    inputs = capture_first_layer_inputs(model, ids, torch.ones(3, 17, dtype=torch.bool))
    for layer in model.model.layers:
        expected = run_layer(layer, inputs)
        layer_pass = LayerPass(layer, inputs)
        seen = [layer_pass.advance(group) for group in STAGES]
        assert [x.shape[-1] for x in seen] == [64, 64, 64, 160]
        assert torch.equal(layer_pass.finish(), expected)
        inputs = LayerInputs(expected, inputs.token_mask, inputs.layer_kwargs)
    with pytest.raises(ValueError, match="unknown input group"):
        LayerPass(model.model.layers[0], inputs).advance("lm_head")


def test_onednn_linears_follow_versioned_weight_writes() -> None:
    from inlaid.quant.model_io import onednn_linears, release_onednn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8, bias=False))
    x = torch.randn(5, 7, 64, dtype=torch.float64).float()

    def reference() -> torch.Tensor:
        hidden = x.double() @ model[0].weight.double().T + model[0].bias.double()
        return (hidden @ model[1].weight.double().T).float()

    onednn_linears(model)
    torch.testing.assert_close(model(x), reference(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # what the quantizer does: the next call re-packs
        model[0].weight.copy_(torch.randn(32, 64))
    torch.testing.assert_close(model(x), reference(), rtol=1e-5, atol=1e-5)
    model[1].weight.data.mul_(-2.0)  # invisible to the version counter: released explicitly
    release_onednn(model)
    torch.testing.assert_close(model(x), reference(), rtol=1e-5, atol=1e-5)


def test_layer_adapter_switch_is_the_model_wide_switch() -> None:
    """The quantizer switches adapters inside the one layer it runs (`layer_adapter`); each
    layer's output equals the one under PEFT's model-wide `set_adapter` / `disable_adapter`,
    for adapters on every linear, on attention only (an MLP-less adapter), and adapters off,
    in an order that leaves each state behind for the next."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from inlaid.quant.model_io import active_adapter, capture_first_layer_inputs, layer_adapter, run_layer

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    everywhere = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(base, everywhere, adapter_name="all")
    model.add_adapter("attn", peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    model.eval()
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    inputs = capture_first_layer_inputs(model, ids, torch.ones(2, 11, dtype=torch.bool))
    layers = model.base_model.model.model.layers
    outputs = {}
    for name in ("all", None, "attn", "all"):
        with torch.no_grad(), active_adapter(model, name):
            expected = [run_layer(layer, inputs) for layer in layers]
        model.set_adapter("attn" if name == "all" else "all")  # a stale model-wide state
        with torch.no_grad():
            got = []
            for layer in layers:
                with layer_adapter(layer, model, name):
                    got.append(run_layer(layer, inputs))
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), name
        outputs[name] = got[0]
    assert not torch.equal(outputs["all"], outputs[None]) and not torch.equal(outputs["attn"], outputs[None])
