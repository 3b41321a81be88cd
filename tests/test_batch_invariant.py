"""`batch_invariant` (EngineConfig, `[executor]`, `inlaid generate --batch-invariant`): every
row of a CPU int4 projection takes one kernel whatever the call's row count, so a request's
4-bit answer does not depend on what shares its steps. By default a call of many prompt rows
takes the bf16 route, which rounds the weight to bf16 where the few-rows kernels use it exactly:
an outside probe saw a 2-token prompt's logits move by 0.16 (its greedy token flip) when a
93-token prompt shared its prefill step, and `inlaid generate --quantized` disagree with the
server on 4 of 29 requests. The engine-level check is in tests/test_engine_quantized.py."""

from __future__ import annotations

import sys

import pytest
import torch

from inlaid.engine.config import EngineConfig
from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.int4_dot import dot_kernel_available
from inlaid.kernels.int4_native import native_int4_available
from inlaid.kernels.testing import random_gptq_layer
from inlaid.serve.config import ConfigError, config_from_dict

ROWS = 260  # past every bf16 route's bound (48, 128, 192 rows by machine)


@pytest.mark.skipif(not (native_int4_available() or dot_kernel_available()),
                    reason="neither the native nor the dot-product int4 kernel built here: torch's int4 kernel "
                           "serves the rows, whose row independence this project does not claim")
@pytest.mark.parametrize("in_features, out_features, group, act_order", [(576, 192, 64, False),
                                                                         (1536, 576, 128, True)])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(in_features: int, out_features: int, group: int,
                                                             act_order: bool) -> None:
    layer = random_gptq_layer(in_features, out_features, 4, group, act_order=act_order, seed=in_features)
    fixed = prepare_quant_linear(layer.weights, "cpu", torch.float32, batch_invariant=True)
    assert fixed.dense_min_m == fixed.prefill_dense_min_m == sys.maxsize
    x = torch.randn(ROWS, in_features, generator=torch.Generator().manual_seed(out_features))
    whole = quant_matmul(x, fixed, prefill=True)
    out = torch.full_like(whole, float("nan"))
    assert quant_matmul(x, fixed, out=out) is out and torch.equal(out, whole)  # decode rows: the same route
    for start, stop in ((0, 2), (7, 60), (100, ROWS)):
        for prefill in (False, True):
            assert torch.equal(quant_matmul(x[start:stop].clone(), fixed, prefill=prefill), whole[start:stop])
    default = prepare_quant_linear(layer.weights, "cpu", torch.float32)
    if default.prefill_dense_min_m <= ROWS:  # a CPU with a bf16 route: what the option removes
        assert not torch.equal(quant_matmul(x, default, prefill=True)[:2],
                               quant_matmul(x[:2].clone(), default, prefill=True))


def test_the_option_is_checked_and_reaches_the_engine_from_the_server_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="batch_invariant must be true or false, got 'yes'"):
        EngineConfig(model_dir=str(tmp_path), batch_invariant="yes").validate()
    with pytest.raises(ValueError, match="batch_invariant is a CPU option"):
        EngineConfig(model_dir=str(tmp_path), device="cuda", batch_invariant=True).validate()
    address = "ipc:///tmp/inlaid-check.ipc"
    config = config_from_dict({"model": {"dir": str(tmp_path)}, "server": {"address": address},
                               "executor": {"batch_invariant": True}})
    assert config.engine.batch_invariant is True
    with pytest.raises(ConfigError, match="batch_invariant"):
        config_from_dict({"model": {"dir": str(tmp_path)}, "server": {"address": address},
                          "executor": {"batch_invariant": 1}})


def test_a_row_invariant_step_sends_no_adapters_rows_to_the_matmul_route() -> None:
    """An adapter with 32 or more rows of a step took torch's matmul pair, the others the
    native kernel: a decode row's LoRA bits moved when a prompt of its adapter joined its step
    (a soak saw greedy answers flip). Row-invariant steps (the engine's batch_invariant) keep
    every row on the native kernel, which computes each row alone."""
    from inlaid.kernels.dispatch import lora_host_segments
    from inlaid.kernels.lora_cpu import NATIVE_MAX_GROUP_TOKENS

    starts, slots = torch.tensor([0, 40, 41], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    assert NATIVE_MAX_GROUP_TOKENS <= 40
    assert [slot for slot, _ in lora_host_segments(starts, slots, 41, 2).native_large_groups] == [0]
    assert lora_host_segments(starts, slots, 41, 2, row_invariant=True).native_large_groups == ()
