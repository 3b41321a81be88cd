"""The executor process: owns the model, KV cache and adapter pool; runs BatchPlans.

Started by the coordinator (`python -m inlaid.serve.executor ...`). It connects a DEALER
socket to the coordinator's backend ROUTER, says ExecutorHello once the model is loaded,
then answers every BatchPlan with a StepResult (or an ExecutorFailure when running the
plan raised). It exits when told to (ExecutorShutdown) or when the coordinator that
started it is gone. This is the only serving process that imports torch.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING

import msgspec
import zmq

from inlaid.engine.config import EngineConfig, ModelLoadError
from inlaid.protocol import (
    PROTOCOL_VERSION,
    BatchPlan,
    ExecutorFailure,
    ExecutorHello,
    ExecutorInbound,
    ExecutorShutdown,
    ExecutorStartFailure,
    ExecutorStats,
    LayerSwap,
    LayerSwapResult,
)
from inlaid.serve.logs import setup_logging

if TYPE_CHECKING:
    import torch

    from inlaid.engine.runner import ModelRunner

log = logging.getLogger("inlaid.executor")

_MAX_CONSECUTIVE_FAILURES = 3  # plans that raise in a row: the runner is likely broken; exit
_STATS_INTERVAL_S = 1.0
_PARENT_POLL_MS = 1000
# Fault injection for the fault tests and the soak (never set in production): a JSON object
# {"close_socket_after_plan": N, "exit_delay_s": D, "generations": [...]}. The executor of a
# listed generation (any, when omitted) answers its N-th plan, closes its socket and exits
# D seconds later: the way it leaves after too many failed plans, when the interpreter's
# teardown keeps the process alive for a while after its socket is gone.
FAULT_ENV = "INLAID_EXECUTOR_FAULT"


@dataclasses.dataclass(frozen=True)
class InjectedFault:
    close_socket_after_plan: int
    exit_delay_s: float = 1.0

    @staticmethod
    def from_env(generation: int) -> "InjectedFault | None":
        text = os.environ.get(FAULT_ENV)
        if not text:
            return None
        spec = json.loads(text)
        if generation not in spec.get("generations", [generation]):
            return None
        return InjectedFault(int(spec["close_socket_after_plan"]), float(spec.get("exit_delay_s", 1.0)))


def executor_identity(generation: int) -> bytes:
    return f"executor-{generation}".encode()


def die_with_parent() -> None:
    """Linux: get SIGKILL when the coordinator dies, so no orphan keeps the GPU."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # elsewhere: the parent-pid poll in the loop covers it


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _stats(runner: object, steps: int) -> ExecutorStats:
    allocated = reserved = 0
    device = getattr(runner, "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        allocated = int(torch.cuda.memory_allocated(device))
        reserved = int(torch.cuda.memory_reserved(device))
    return ExecutorStats(
        rss_bytes=_rss_bytes(), device_memory_allocated=allocated, device_memory_reserved=reserved, steps=steps
    )


def apply_swap(runner: ModelRunner, swap: LayerSwap) -> LayerSwapResult:
    """Install one re-quantized layer between steps; a failure leaves the old layer serving."""
    from inlaid.serve.layer_transport import LayerTransportError, open_layer, read_checkpoint_layer

    started = time.perf_counter()
    try:
        if swap.handle.transport == "checkpoint":  # what this executor loaded, wherever the coordinator's lies
            tensors = read_checkpoint_layer(str(runner.config.quantized_dir or ""), swap.layer)
        else:
            tensors = open_layer(swap.handle)
        _check_finite(swap, tensors)
        runner.swap_layer(swap.layer, swap.version, tensors)
    except (LayerTransportError, ValueError, RuntimeError) as error:
        log.error("layer swap failed", extra={"layer": swap.layer, "version": swap.version, "error": repr(error)})
        return LayerSwapResult(layer=swap.layer, version=swap.version, ok=False, error=str(error)[:2000],
                               seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    log.info("layer swapped", extra={"layer": swap.layer, "version": swap.version, "transport": swap.handle.transport,
                                     "seconds": round(seconds, 4)})
    return LayerSwapResult(layer=swap.layer, version=swap.version, ok=True, seconds=seconds)


def _check_finite(swap: LayerSwap, tensors: dict[str, torch.Tensor]) -> None:
    """A layer with NaN or infinite values (a corrupted file: its scales) would make every
    request fail with 'NaN or infinite logits' while health says ok: refuse it, so the old
    layer keeps serving (for a restored one, the checkpoint's)."""
    import torch

    bad = [key for key, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ValueError(f"layer {swap.layer} (version {swap.version}, {swap.handle.transport} {swap.handle.name}) "
                         f"holds NaN or infinite values in {', '.join(sorted(bad)[:4])}")


def undecodable_plan_failure(frame: bytes, error: str) -> ExecutorFailure | None:
    """The answer to a plan this executor cannot decode (a bad field, e.g. a layer swap's
    version): an ExecutorFailure for its step, when the frame names one. Silence instead left
    the coordinator waiting until the step timeout killed this executor, and its successor got
    the same plan."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return None
    step_id = raw.get("step_id") if isinstance(raw, dict) and raw.get("type") == "batch_plan" else None
    if not isinstance(step_id, int) or isinstance(step_id, bool):
        return None
    return ExecutorFailure(step_id=step_id, error_type="UndecodablePlan",
                           message=f"the executor could not decode this plan: {error}"[:2000])


def capture_graphs(runner: object) -> list[int]:
    """The decode graphs' batch sizes, captured now on CUDA (`[executor] cuda_graphs`). A
    failed capture is logged and the executor serves without graphs: they only save launch
    time (the first H200 run found one failing on a 32-layer model, bench/results/gpu_h200.md)."""
    capture = getattr(runner, "capture_cuda_graphs", None)
    if getattr(runner, "device", None) is None or runner.device.type != "cuda" or not callable(capture):
        return []
    try:
        return list(capture() or [])
    except Exception as error:  # noqa: BLE001  (any capture failure: eager steps still compute right)
        log.error("CUDA graph capture failed; serving without graphs",
                  extra={"error": f"{type(error).__name__}: {error}"})
        runner.decode_graphs = None  # type: ignore[attr-defined]
        return []


def serve(address: str, generation: int, config: EngineConfig, parent_pid: int) -> int:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, executor_identity(generation))
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(address)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(ExecutorInbound)

    started = time.perf_counter()
    from inlaid.engine.runner import ModelRunner  # torch: only here

    try:
        runner = ModelRunner(config)
        graph_sizes = capture_graphs(runner)
    except Exception as error:  # noqa: BLE001  (whatever it is, the coordinator is told before the exit)
        # One record, not an uncaught traceback on stderr (which broke JSON log lines): a bad
        # input is its message; anything else keeps its traceback, inside the record.
        log.error("cannot load the model", exc_info=not isinstance(error, (ModelLoadError, OSError)),
                  extra={"error": str(error), "error_type": type(error).__name__})
        one_line = " ".join(str(error).split())[:2000]  # it ends the server's one-line reason (torch's span lines)
        sock.send(encoder.encode(ExecutorStartFailure(error_type=type(error).__name__, message=one_line)))
        sock.close()  # lingers (1 s at most) until the coordinator has it
        context.term()
        return 1
    hello = ExecutorHello(
        protocol_version=PROTOCOL_VERSION,
        generation=generation,
        pid=os.getpid(),
        device=str(runner.device),
        num_kv_blocks=config.num_kv_blocks,
        load_seconds=time.perf_counter() - started,
        cuda_graph_batch_sizes=graph_sizes,
    )
    sock.send(encoder.encode(hello))
    sock.send(encoder.encode(_stats(runner, 0)))
    log.info("executor ready", extra={"pid": os.getpid(), "generation": generation, "device": hello.device,
                                      "load_seconds": round(hello.load_seconds, 3)})

    steps = 0
    plans = 0
    consecutive_failures = 0
    last_stats = time.monotonic()
    fault = InjectedFault.from_env(generation)
    while True:
        if not sock.poll(_PARENT_POLL_MS, zmq.POLLIN):
            if os.getppid() != parent_pid:
                log.warning("coordinator is gone; exiting")
                return 0
            continue
        frame = sock.recv()
        try:
            message = decoder.decode(frame)
        except (msgspec.DecodeError, ValueError) as error:
            # Only the coordinator talks to us; a bad frame is a bug there, not a reason to die
            # (nor one to count toward the failed plans that restart a broken runner).
            log.error("undecodable frame from the coordinator", extra={"error": str(error)})
            failure = undecodable_plan_failure(frame, str(error))
            if failure is not None:
                sock.send(encoder.encode(failure))
            continue
        if isinstance(message, ExecutorShutdown):
            log.info("executor shutting down", extra={"steps": steps})
            return 0
        assert isinstance(message, BatchPlan)
        plans += 1
        for swap in message.layer_swaps:
            sock.send(encoder.encode(apply_swap(runner, swap)))
        try:
            result = runner.execute(message)
        except Exception as error:  # report, keep serving: the coordinator fails this plan's requests
            consecutive_failures += 1
            log.error("plan failed", extra={"step_id": message.step_id, "error": repr(error),
                                            "trace": traceback.format_exc(limit=8)})
            sock.send(encoder.encode(ExecutorFailure(step_id=message.step_id, error_type=type(error).__name__,
                                                     message=str(error)[:2000])))
            if consecutive_failures >= _MAX_CONSECUTIVE_FAILURES:
                log.error("too many failed plans in a row; exiting so the coordinator restarts a fresh executor")
                return 1
            continue
        consecutive_failures = 0
        steps += 1
        sock.send(encoder.encode(result))
        if fault is not None and plans == fault.close_socket_after_plan:
            log.warning("injected fault: socket closed; exiting later", extra={"exit_delay_s": fault.exit_delay_s})
            sock.close(linger=1000)  # the answer still goes out, as it did before the real exit
            time.sleep(fault.exit_delay_s)
            return 1
        now = time.monotonic()
        if now - last_stats >= _STATS_INTERVAL_S:
            sock.send(encoder.encode(_stats(runner, steps)))
            last_stats = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inlaid-executor")
    parser.add_argument("--address", required=True, help="the coordinator's backend endpoint")
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--engine-config", required=True, help="EngineConfig as a JSON object")
    parser.add_argument("--parent-pid", type=int, default=os.getppid())
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--index", type=int, default=0, help="the server's executor number, on every log line")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format, fields={"executor": args.index})
    die_with_parent()
    # Ctrl-C in a terminal, or SIGTERM sent to the whole process group, must not kill the
    # executor under requests the coordinator is still finishing: the coordinator stops it
    # (ExecutorShutdown), and PDEATHSIG / the parent poll end it if the coordinator dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = EngineConfig(**json.loads(args.engine_config))
    return serve(args.address, args.generation, config, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
