"""GPTQ checkpoint tensors: pack/unpack round trips, the format's dequantization equals the
quantizer's, write/load of a directory, and the kernels' matmul on what we wrote."""

from __future__ import annotations

import json

import pytest
import torch

from inlaid.kernels.dispatch import prepare_quant_linear, quant_matmul
from inlaid.kernels.gptq_format import dequantize_gptq
from inlaid.quant.checkpoint import (
    CheckpointMetadata, dequantized_state_dict, load_gptq_checkpoint, pack_linear, unpack_linear, write_checkpoint,
)
from inlaid.quant.errors import CheckpointError
from inlaid.quant.gptq import gptq_quantize, rtn_quantize
from inlaid.quant.spec import QuantSpec


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py



def _random_quantized(rows: int, cols: int, spec: QuantSpec, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    inputs = torch.randn(256, cols, generator=generator) * (torch.rand(cols, generator=generator) * 2 + 0.1)
    hessian = 2 * inputs.T @ inputs / 256
    return weight, gptq_quantize(weight, hessian, spec)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "shape,group_size,act_order,static",
    [((64, 128), 32, False, True), ((96, 96), 64, False, True), ((32, 160), -1, False, True),
     ((64, 128), 32, True, False)],
    ids=["g32", "ragged-last-group", "perchannel", "actorder-dynamic"],
)
def test_pack_unpack_round_trip_is_bit_exact(bits, shape, group_size, act_order, static) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, act_order=act_order, static_groups=static)
    _, quantized = _random_quantized(*shape, spec, seed=bits)
    tensors = pack_linear("layer", quantized)
    out_features, in_features = shape
    assert tensors["layer.qweight"].dtype == torch.int32
    assert tensors["layer.qweight"].shape == (in_features * bits // 32, out_features)
    assert tensors["layer.qzeros"].shape == (spec.num_groups(in_features), out_features * bits // 32)
    assert tensors["layer.scales"].dtype == torch.float16
    from inlaid.kernels.dispatch import QuantLinearWeights

    weights = QuantLinearWeights(
        qweight=tensors["layer.qweight"], qzeros=tensors["layer.qzeros"], scales=tensors["layer.scales"],
        g_idx=tensors["layer.g_idx"], bits=bits, group_size=quantized.group_size,
        in_features=in_features, out_features=out_features,
    )
    back = unpack_linear(weights)
    assert torch.equal(back.codes, quantized.codes)
    assert torch.equal(back.zeros, quantized.zeros)
    assert torch.equal(back.g_idx, quantized.g_idx)
    assert torch.equal(back.scales, quantized.scales)
    # the format's own dequantization (kernels' reference) gives exactly the quantizer's weight
    reference = dequantize_gptq(weights.qweight, weights.qzeros, weights.scales, weights.g_idx, bits)
    assert torch.equal(reference.T, quantized.dequantize())
    if act_order and not static:
        assert not bool((quantized.g_idx[1:] >= quantized.g_idx[:-1]).all())  # really permuted


def _write_small_checkpoint(directory, spec: QuantSpec):
    linears, expected = {}, {}
    for index, (rows, cols) in enumerate([(64, 128), (128, 64)]):
        weight, quantized = _random_quantized(rows, cols, spec, seed=10 + index)
        bias = torch.randn(rows) if index == 1 else None
        linears.update(pack_linear(f"model.layers.0.proj{index}", quantized, bias))
        expected[f"model.layers.0.proj{index}"] = (quantized, bias)
    floats = {"model.norm.weight": torch.randn(64), "model.embed_tokens.weight": torch.randn(100, 64)}
    metadata = CheckpointMetadata(method="mlgptq", tasks=[{"name": "a", "samples": 3}], spec=spec.to_dict())
    write_checkpoint(directory, directory, {"model_type": "llama", "hidden_size": 64}, linears, floats, spec, metadata)
    return expected, floats


def test_checkpoint_directory_round_trip_and_kernel_matmul(tmp_path) -> None:
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    expected, floats = _write_small_checkpoint(tmp_path, spec)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
        "static_groups": True, "sym": False, "damp_percent": 0.01, "true_sequential": True,
        "modules_in_block_to_quantize": None,
    }
    assert json.loads((tmp_path / "quantize_config.json").read_text())["bits"] == 4
    checkpoint = load_gptq_checkpoint(tmp_path)
    assert checkpoint.metadata["method"] == "mlgptq"
    assert set(checkpoint.tensors) == set(floats)
    assert torch.equal(checkpoint.tensors["model.norm.weight"], floats["model.norm.weight"])
    state = dequantized_state_dict(checkpoint)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    for prefix, (quantized, bias) in expected.items():
        weights = checkpoint.linears[prefix]
        assert (weights.in_features, weights.out_features) == (quantized.in_features, quantized.out_features)
        assert torch.equal(state[prefix + ".weight"], quantized.dequantize())
        if bias is not None:
            assert torch.equal(weights.bias, bias.half())
        inputs = x[:, : weights.in_features]
        reference = inputs.double() @ quantized.dequantize(torch.float64).T
        if bias is not None:
            reference = reference + bias.half().double()
        for mode in ("dequant", "int4"):
            prepared = prepare_quant_linear(weights, "cpu", torch.float32, mode=mode)
            out = quant_matmul(inputs, prepared)
            tolerance = 1e-4 if mode == "dequant" else 2e-2  # int4 path computes in bf16
            torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance * float(reference.abs().max()))


def test_loading_rejects_incomplete_directories(tmp_path) -> None:
    with pytest.raises(CheckpointError):
        load_gptq_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no GPTQ"):
        load_gptq_checkpoint(tmp_path)


def test_rtn_and_gptq_share_the_storage_convention() -> None:
    spec = QuantSpec(bits=3, group_size=32)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    rtn = rtn_quantize(weight, spec)
    identity = gptq_quantize(weight, torch.eye(64), QuantSpec(bits=3, group_size=32, damp_percent=0.0))
    # with H = I there is nothing to compensate: GPTQ reduces to round-to-nearest
    assert torch.equal(rtn.codes, identity.codes) and torch.equal(rtn.scales, identity.scales)


def test_weights_file_header_has_its_metadata_keys_sorted(tmp_path) -> None:
    """safetensors writes `__metadata__` in a hash map's order, which changes from process to
    process: here a file written with the keys reversed is put in order, its tensors unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from inlaid.quant.checkpoint import _sort_header_metadata

    path = tmp_path / "model.safetensors"
    tensors = {"b": torch.arange(6, dtype=torch.int32), "a": torch.randn(3, 2)}
    save_file(tensors, str(path), metadata={"quant_method": "gptq", "format": "pt"})
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header["__metadata__"] = {"quant_method": "gptq", "format": "pt"}  # whatever order it was written in
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + text.ljust(length, b" ") + raw[8 + length:])
    _sort_header_metadata(path)
    rewritten = path.read_bytes()
    assert len(rewritten) == len(raw)
    assert rewritten[8:8 + length].startswith(b'{"__metadata__":{"format":"pt","quant_method":"gptq"}')
    assert rewritten[8 + length:] == raw[8 + length:]
    with safe_open(str(path), "pt") as opened:
        assert opened.metadata() == {"format": "pt", "quant_method": "gptq"}
    for name, tensor in load_file(str(path)).items():
        assert torch.equal(tensor, tensors[name])


def test_the_same_checkpoint_written_by_separate_processes_has_the_same_bytes(tmp_path) -> None:
    """Six processes (each with its own hash seed in safetensors' writer) write one checkpoint:
    its weights file has one sha256 (before the header was sorted, a pair of processes wrote
    two different files half the time)."""
    import hashlib
    import subprocess
    import sys

    script = (
        "import sys, torch; from pathlib import Path\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_quant_checkpoint import _write_small_checkpoint\n"
        "from inlaid.quant.spec import QuantSpec\n"
        "torch.set_num_threads(1); torch.manual_seed(0)  # the float tensors are drawn unseeded\n"
        "_write_small_checkpoint(Path(sys.argv[1]), QuantSpec(bits=4, group_size=32))\n"
    )
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    digests = set()
    for run in range(6):
        out = tmp_path / f"run{run}"
        subprocess.run([sys.executable, "-c", script, str(out), tests_dir], check=True, timeout=120)
        digests.add(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
