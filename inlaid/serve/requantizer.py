"""The requantizer process: re-quantizes the served base for an added task, layer by layer,
at the lowest priority the machine offers, and hands each finished layer to the executor.

Started by the coordinator (`python -m inlaid.serve.requantizer ...`, see
requantizer_supervisor.py). It says RequantizerHello, then runs one RequantizeJob at a time
through `inlaid.quant.incremental`. For each layer it persists the merged Hessian state and
(when any linear changed) the layer's GPTQ tensors, exports them (shared memory, or CUDA IPC
handles for a GPU executor) and sends LayerReady; it goes on only once the coordinator
answers LayerCommitted, so at most one layer's new weights are in flight. A cancelled job
or a shutdown stops after the current input group (four per layer) or while it waits for a
commit; a cancelled job answers JobFinished (not ok, "cancelled").

Priority: `nice` 19, Linux SCHED_IDLE when asked (the scheduler runs it only on CPU time
nothing else wants), `threads` torch threads, OMP_WAIT_POLICY=PASSIVE (set by the
supervisor before torch starts), and on a GPU its copies go on the lowest-priority stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import msgspec
import zmq

from inlaid.protocol import (
    PROTOCOL_VERSION,
    CancelJob,
    JobFinished,
    LayerCommitted,
    LayerReady,
    LinearOutcome,
    RequantizeJob,
    RequantizerHello,
    RequantizerInbound,
    RequantizerShutdown,
)
from inlaid.serve.cpu_priority import DutyCycle, lower_priority
from inlaid.serve.logs import setup_logging

if TYPE_CHECKING:
    import torch

    from inlaid.quant.layer_decisions import LinearDecision

log = logging.getLogger("inlaid.requantizer")

_POLL_MS = 1000
# How long a failed job looks for a cancel that caused it: a removal deletes the task's files,
# then its coordinator sends the cancel (on its next loop turn); a real failure is reported
# this much later.
CANCEL_GRACE_MS = 200


class _Stop(Exception):
    """The job ends early: cancelled (shutdown False) or the process is told to exit."""

    def __init__(self, shutdown: bool) -> None:
        super().__init__("shutdown" if shutdown else "cancelled")
        self.shutdown = shutdown


class _Channel:
    def __init__(self, address: str, generation: int, parent_pid: int) -> None:
        from inlaid.serve.requantizer_supervisor import requantizer_identity

        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, requantizer_identity(generation))
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(address)
        self.parent_pid = parent_pid
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(RequantizerInbound)
        self._held: deque[msgspec.Struct] = deque()  # read mid-layer by `check_stop`, not for it

    def send(self, message: msgspec.Struct) -> None:
        self.sock.send(self.encoder.encode(message))

    def close(self) -> None:
        """Let what was sent go out (at most the linger), then release the socket."""
        self.sock.close()
        self.context.term()

    def receive(self) -> msgspec.Struct | None:
        """The next message; None after a quiet poll. Exits when the coordinator is gone."""
        if self._held:
            return self._held.popleft()
        if not self.sock.poll(_POLL_MS, zmq.POLLIN):
            if os.getppid() != self.parent_pid:
                log.warning("coordinator is gone; exiting")
                sys.exit(0)
            return None
        return self._decode(self.sock.recv())

    def check_stop(self, job_id: str, wait_ms: int = 0) -> None:
        """Raise _Stop if a cancel of this job or a shutdown has arrived, or arrives within
        `wait_ms`; anything else read here is kept for `receive`. Called after every input
        group, so a cancel stops a job within a group rather than a layer."""
        deadline = time.monotonic() + wait_ms / 1000
        while self.sock.poll(max(0, round((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            message = self._decode(self.sock.recv())
            if isinstance(message, CancelJob) and message.job_id == job_id:
                raise _Stop(shutdown=False)
            if isinstance(message, RequantizerShutdown):
                raise _Stop(shutdown=True)
            if message is not None:
                self._held.append(message)

    def _decode(self, frame: bytes) -> msgspec.Struct | None:
        try:
            return self.decoder.decode(frame)
        except (msgspec.DecodeError, ValueError) as error:
            log.error("undecodable frame from the coordinator", extra={"error": str(error)})
            self._refuse_undecodable_job(frame, str(error))
            return None

    def _refuse_undecodable_job(self, frame: bytes, error: str) -> None:
        """A job the coordinator sent but this process cannot decode fails at once, with the
        reason: ignored, it was owed forever (killed for no progress, restarted, sent again)."""
        try:
            raw = msgspec.msgpack.decode(frame)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return
        job_id = raw.get("job_id") if isinstance(raw, dict) and raw.get("type") == "requantize_job" else None
        if isinstance(job_id, str):
            self.send(JobFinished(job_id=job_id, ok=False, error=f"undecodable job from the coordinator: {error}"))

    def wait_commit(self, job_id: str, layer: int) -> LayerCommitted:
        while True:
            message = self.receive()
            if isinstance(message, LayerCommitted) and message.job_id == job_id and message.layer == layer:
                return message
            if isinstance(message, CancelJob) and message.job_id == job_id:
                raise _Stop(shutdown=False)
            if isinstance(message, RequantizerShutdown):
                raise _Stop(shutdown=True)


def _linear_outcomes(decisions: list[LinearDecision]) -> list[LinearOutcome]:
    return [LinearOutcome(linear=d.linear, action=d.action, change=d.change, reason=d.reason,
                          errors_served=d.errors_served, errors_new=d.errors_new) for d in decisions]


def _save_layer(tensors: dict[str, torch.Tensor], directory: str, layer: int, version: int) -> str:
    from safetensors.torch import save_file

    path = Path(directory) / f"layer_{layer:03d}.v{version}.safetensors"
    temporary = path.with_suffix(".tmp")
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, str(temporary))
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    temporary.replace(path)
    return str(path)


def _unreadable_safetensors(path: Path) -> bool:
    """Whether `path`'s safetensors header cannot be read (each tensor's too)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except (SafetensorError, OSError):
        return True
    return False


def run_job(channel: _Channel, job: RequantizeJob) -> None:
    """Raises _Stop when cancelled or told to exit mid-way; reports every other ending."""
    from inlaid.quant.calibration import CalibrationTask
    from inlaid.quant.errors import QuantizationError
    from inlaid.quant.incremental import IncrementalQuantizer, IncrementalSettings
    from inlaid.serve.layer_transport import export_layer

    log.info("job started", extra={"job_id": job.job_id, "task": job.task, "start_layer": job.start_layer})
    started = time.perf_counter()
    try:
        settings = IncrementalSettings(
            change_threshold=job.change_threshold, quality_tolerance=job.quality_tolerance,
            max_samples=job.max_samples)
        task = CalibrationTask(job.task, Path(job.adapter_dir), Path(job.calibration))
        pacer = DutyCycle(job.duty_cycle, job.idle_duty_cycle) if min(job.duty_cycle, job.idle_duty_cycle) < 1 else None

        def pace() -> None:  # after every input group: the duty cycle's sleep, then a cancel's check
            if pacer is not None:
                pacer.pace()
            channel.check_stop(job.job_id)

        quantizer = IncrementalQuantizer(
            Path(job.model_dir), Path(job.checkpoint_dir), task, settings, Path(job.state_dir),
            served_layers={layer: Path(file) for layer, file in job.served_layers.items()},
            state_dirs=[Path(job.state_dir)], drop_tasks=job.drop_tasks, pace=pace)
        for outcome in quantizer.layers(job.start_layer):
            if outcome.layer < job.start_layer:
                continue  # a resumed job runs through its finished layers
            exported = None
            file = ""
            if outcome.changed:
                file = _save_layer(outcome.tensors, job.layers_dir, outcome.layer, job.version)
                exported = export_layer(outcome.tensors, job.device)
            try:
                channel.send(LayerReady(
                    job_id=job.job_id, layer=outcome.layer, version=job.version,
                    handle=exported.handle if exported else None, file=file,
                    linears=_linear_outcomes(outcome.decisions), forward_seconds=outcome.forward_seconds,
                    quantize_seconds=outcome.quantize_seconds, peak_rss_bytes=_peak_rss_bytes()))
                committed = channel.wait_commit(job.job_id, outcome.layer)
            finally:
                if exported is not None:
                    exported.release()
            log.info("layer done", extra={"job_id": job.job_id, "layer": outcome.layer, "swapped": committed.swapped,
                                          "requantized": sum(d.swapped for d in outcome.decisions),
                                          "forward_s": round(outcome.forward_seconds, 3),
                                          "quantize_s": round(outcome.quantize_seconds, 3)})
            if outcome.changed and not committed.swapped:
                raise QuantizationError(f"the executor could not swap in layer {outcome.layer}: {committed.error}")
    except _Stop:
        raise
    except Exception as error:  # every failure ends the job with a reason; the process lives on
        # A removed task's job fails on what the removal took away (its calibration copy,
        # deleted as the cancel is sent): that is its cancel, not an ERROR with a traceback.
        channel.check_stop(job.job_id, wait_ms=CANCEL_GRACE_MS)
        # A failure the job names (a damaged state file, a missing calibration copy) needs no
        # traceback; anything else is a bug, and its traceback is what finds it.
        from safetensors import SafetensorError

        named = isinstance(error, (QuantizationError, OSError, SafetensorError))
        log.error("job failed", extra={"job_id": job.job_id, "error": repr(error),
                                       **({} if named else {"trace": traceback.format_exc(limit=8)})})
        reason = f"{type(error).__name__}: {error}"
        weights = Path(job.adapter_dir) / "adapter_model.safetensors"
        # The raw text names no file (an outside probe); the adapter is named only when it is the
        # file that fails (the Hessian state, a layer's file or the base raise the same error).
        if isinstance(error, SafetensorError) and _unreadable_safetensors(weights):
            reason = f"the task's adapter weights ({weights}) cannot be read, damaged or changed since the task " \
                     f"was added ({error})"
        channel.send(JobFinished(job_id=job.job_id, ok=False, error=reason[:2000], peak_rss_bytes=_peak_rss_bytes()))
        return
    paced = {"paced_busy": pacer.busy_intervals, "paced_idle": pacer.idle_intervals} if pacer is not None else {}
    log.info("job finished", extra={"job_id": job.job_id, "seconds": round(time.perf_counter() - started, 2), **paced})
    channel.send(JobFinished(job_id=job.job_id, ok=True, peak_rss_bytes=_peak_rss_bytes()))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(address: str, generation: int, parent_pid: int, threads: int, niceness: int, idle: bool) -> int:
    idle_taken = lower_priority(niceness, idle)
    import torch  # after the priority: its thread pool inherits it

    torch.set_num_threads(threads)
    channel = _Channel(address, generation, parent_pid)
    channel.send(RequantizerHello(protocol_version=PROTOCOL_VERSION, generation=generation, pid=os.getpid(),
                                  threads=threads, niceness=os.nice(0), idle_priority=idle_taken))
    log.info("requantizer ready", extra={"pid": os.getpid(), "generation": generation, "threads": threads})
    try:
        return _serve_jobs(channel)
    finally:
        channel.close()


def _serve_jobs(channel: _Channel) -> int:
    while True:
        message = channel.receive()
        if isinstance(message, RequantizerShutdown):
            return 0
        if isinstance(message, RequantizeJob):
            try:
                run_job(channel, message)
            except _Stop as stop:
                log.info("job stopped", extra={"job_id": message.job_id, "reason": str(stop)})
                if stop.shutdown:
                    return 0
                # The coordinator sends the next job once it hears from the cancelled one (a
                # cancel taken up mid-layer leaves nothing else to hear).
                channel.send(JobFinished(job_id=message.job_id, ok=False, error="cancelled",
                                         peak_rss_bytes=_peak_rss_bytes()))


def setup_process_output(level: str, fmt: str) -> None:
    """The process's logging, and nothing else on its stderr, which the server's log shares
    (one JSON object a line): an outside probe found transformers' "Loading weights" progress
    bars and a FutureWarning from it between the records at every job. The bars go (they
    tell an operator nothing; the job's layers are logged); Python warnings are kept, as
    log records through the same handler, so a real one is still seen. Errors are untouched:
    they are logged, and a crash's traceback still reaches stderr as before."""
    setup_logging(level, fmt)
    # huggingface_hub reads it when first imported, and transformers takes its progress-bar
    # switch from huggingface_hub then; torch and transformers come after this (lazily).
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for module, switch in (("huggingface_hub.utils", "disable_progress_bars"),
                           ("transformers.utils.logging", "disable_progress_bar")):
        if module in sys.modules:  # imported already: the environment is read no more
            getattr(sys.modules[module], switch)()
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = logging.getLogger("inlaid").handlers  # setup_logging's formatter
    warnings_log.propagate = False


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="inlaid-requantizer")
    parser.add_argument("--address", required=True)
    parser.add_argument("--generation", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=os.getppid())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--niceness", type=int, default=19)
    parser.add_argument("--idle-priority", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json")
    args = parser.parse_args(argv)
    setup_process_output(args.log_level, args.log_format)
    from inlaid.serve.executor import die_with_parent

    die_with_parent()
    code = serve(args.address, args.generation, args.parent_pid, args.threads, args.niceness, args.idle_priority)
    # Exit without the interpreter's teardown: at idle priority on a busy machine, unloading
    # torch and the model outlasted the supervisor's 3-s grace, so a shutdown during an add
    # killed the process every time. Nothing is left to it: the socket has flushed, and every
    # exported layer was released when its job stopped.
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
