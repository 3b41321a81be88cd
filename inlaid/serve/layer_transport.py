"""How a re-quantized layer's tensors travel from the requantizer to the executor.

Only a `LayerHandle` goes through the coordinator; the bytes take a side path:

- "shm" (CPU): one POSIX shared-memory segment per layer (`multiprocessing.shared_memory`),
  the tensors packed at 64-byte-aligned offsets listed in the handle. The requantizer
  creates and, once the executor has copied the tensors out, unlinks it; if the requantizer
  dies first, its resource tracker unlinks it (what it never registered: ipc_dirs.remove_segments_of).
- "cuda_ipc" (GPU): the tensors on the executor's device, shared as CUDA IPC handles through
  `torch.multiprocessing`'s reductions (pickled into the handle's payload). The sender keeps
  them alive until the executor has copied them. (Without a GPU the same code path runs on
  CPU tensors under torch's "file_system" sharing strategy: the tests' dry run.)
- "file" (any device): a safetensors file, for committed layers a restarted executor
  restores.
- "checkpoint": the layer of the checkpoint the executor loaded, for an executor that must
  go back to it (`read_checkpoint_layer`: a restore that failed on another executor).

`open_layer` always returns tensors that own their memory (copies), so nothing the executor
serves with depends on the sender's lifetime.
"""

from __future__ import annotations

import os
import pickle
import uuid
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from inlaid.protocol import LayerHandle, TensorSlot
from inlaid.serve.ipc_dirs import segment_prefix

_ALIGN = 64
_CREATED_HERE: set[str] = set()  # segments this process created (and whose tracking it keeps)


class LayerTransportError(RuntimeError):
    """A layer handle cannot be opened (its segment is gone, its tensors do not fit)."""


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise LayerTransportError(f"unknown tensor dtype {name!r} in a layer handle")
    return dtype


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


@dataclass
class ExportedLayer:
    """A layer made visible to another process; `release()` once the receiver has it."""

    handle: LayerHandle
    _segment: shared_memory.SharedMemory | None = None
    _kept: dict[str, torch.Tensor] = field(default_factory=dict)

    def release(self) -> None:
        if self._segment is not None:
            self._segment.close()
            try:
                self._segment.unlink()
            except FileNotFoundError:
                pass
            _CREATED_HERE.discard(self._segment.name)
            self._segment = None
        self._kept.clear()


def export_shm(tensors: dict[str, torch.Tensor]) -> ExportedLayer:
    slots: list[TensorSlot] = []
    offset = 0
    for key, tensor in tensors.items():
        slots.append(TensorSlot(key=key, dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                                offset=offset))
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    segment = shared_memory.SharedMemory(create=True, size=max(offset, 1),
                                         name=f"{segment_prefix(os.getpid())}{uuid.uuid4().hex[:12]}")
    _CREATED_HERE.add(segment.name)
    for slot, tensor in zip(slots, tensors.values()):
        data = _as_bytes(tensor.cpu())
        if data.numel():
            target = torch.frombuffer(segment.buf, dtype=torch.uint8, count=data.numel(), offset=slot.offset)
            target.copy_(data)
            del target  # no view may outlive the mapping
    return ExportedLayer(LayerHandle(transport="shm", name=segment.name, tensors=slots), _segment=segment)


def export_cuda_ipc(tensors: dict[str, torch.Tensor], device: torch.device) -> ExportedLayer:
    from torch.multiprocessing.reductions import reduce_tensor

    if device.type == "cuda":
        # the copy to the device on the lowest-priority stream: serving's kernels go first
        stream = torch.cuda.Stream(device=device, priority=0)
        with torch.cuda.stream(stream):
            kept = {key: tensor.to(device, non_blocking=True) for key, tensor in tensors.items()}
        stream.synchronize()
    else:
        kept = {key: tensor.contiguous().share_memory_() for key, tensor in tensors.items()}
    payload = pickle.dumps({key: reduce_tensor(tensor) for key, tensor in kept.items()})
    return ExportedLayer(LayerHandle(transport="cuda_ipc", name=str(device), payload=payload), _kept=kept)


def export_layer(tensors: dict[str, torch.Tensor], device: str) -> ExportedLayer:
    """The transport for an executor on `device`: CUDA IPC on a GPU, shared memory otherwise."""
    target = torch.device(device)
    return export_cuda_ipc(tensors, target) if target.type == "cuda" else export_shm(tensors)


def _attach(name: str) -> shared_memory.SharedMemory:
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]  # Python >= 3.13
    except TypeError:
        segment = shared_memory.SharedMemory(name=name)
        # Python < 3.13 registers an attached segment too, and its tracker would unlink it at
        # this process's exit: the segment belongs to the sender.
        if name not in _CREATED_HERE:
            resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        return segment


def read_checkpoint_layer(checkpoint_dir: str, layer: int) -> dict[str, torch.Tensor]:
    """The packed tensors of one layer of a GPTQ checkpoint directory, as a layer file holds them."""
    from inlaid.quant.checkpoint import WEIGHTS_FILE
    from inlaid.quant.errors import CheckpointError
    from inlaid.quant.incremental_linears import read_layer_tensors

    try:
        return read_layer_tensors(Path(checkpoint_dir) / WEIGHTS_FILE, layer)
    except (OSError, CheckpointError) as error:
        raise LayerTransportError(f"cannot read layer {layer} of checkpoint {checkpoint_dir}: {error}") from error


def open_layer(handle: LayerHandle) -> dict[str, torch.Tensor]:
    """The tensors behind a handle, copied into memory this process owns."""
    if handle.transport == "file":
        try:
            return load_safetensors(Path(handle.name).read_bytes())  # load_file's tensors map the file
        except (OSError, RuntimeError, SafetensorError) as error:
            raise LayerTransportError(f"cannot read layer file {handle.name}: {error}") from error
    if handle.transport == "cuda_ipc":
        try:
            reduced = pickle.loads(handle.payload)
            shared = {key: rebuild(*args) for key, (rebuild, args) in reduced.items()}
        except Exception as error:  # whatever the rebuild raises: the handle is unusable
            raise LayerTransportError(f"cannot open CUDA IPC layer handle: {error}") from error
        owned = {key: tensor.clone() for key, tensor in shared.items()}
        del shared
        return owned
    if handle.transport != "shm":
        raise LayerTransportError(f"unknown layer transport {handle.transport!r}")
    try:
        segment = _attach(handle.name)
    except FileNotFoundError:
        raise LayerTransportError(f"shared-memory segment {handle.name} is gone (its sender died?)") from None
    try:
        tensors: dict[str, torch.Tensor] = {}
        for slot in handle.tensors:
            dtype = _dtype(slot.dtype)
            count = 1
            for size in slot.shape:
                count *= size
            nbytes = count * torch.empty((), dtype=dtype).element_size()
            if slot.offset < 0 or slot.offset + nbytes > segment.size:
                raise LayerTransportError(f"tensor {slot.key} lies outside segment {handle.name}")
            if nbytes == 0:
                tensors[slot.key] = torch.empty(slot.shape, dtype=dtype)
                continue
            view = torch.frombuffer(segment.buf, dtype=torch.uint8, count=nbytes, offset=slot.offset)
            tensors[slot.key] = view.clone().view(dtype).reshape(slot.shape)
            del view
        return tensors
    finally:
        segment.close()
