"""Projections with a shared base weight and per-token LoRA from a slot pool.

A `LoraLinear` is one projection, possibly fused (q|k|v, gate|up): its base is a dense
weight or one prepared low-bit weight per slice, and each slice has a slot pool of LoRA
A/B matrices padded to the pool's max rank. The tokens of a step are grouped into
segments that share an adapter slot; the segmented shrink/expand kernels (dispatch in
`inlaid.kernels`) add `scale * (x @ A.T) @ B.T` to exactly those tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from inlaid.engine.adapter_config import LORA_KEY_FORM, WEIGHTS_FILE, AdapterError, AdapterSpec, parse_lora_key
from inlaid.engine.lora_fused import MAX_TOKEN_SLOTS, FusedExpandWeight
from inlaid.kernels.dispatch import (
    CompactLoraPools,
    HalfPools,
    HostSegments,
    NativeLoraPools,
    PackedDenseWeight,
    PreparedQuantLinear,
    build_compact_pools,
    lora_apply,
    native_half_copies_worth_it,
    native_lora_available,
    native_pools_fit,
    packing_supported,
    quant_matmul,
    update_compact_slots,
)


@dataclass
class LoraBatch:
    """Adapter segments of one step's flat batch (shared by every layer).

    segment_starts: int32 [G+1] token offsets; segment_slots: int32 [G], -1 = no adapter.
    host: the same segments validated and grouped by slot on the host (CPU path), or None.
    """

    segment_starts: torch.Tensor
    segment_slots: torch.Tensor
    host: HostSegments | None = None
    _slot_masks: dict = field(default_factory=dict, compare=False)

    def slot_mask(self, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, num_slots] 1.0 at each token's slot, zeros for adapter-less tokens (host path;
        built once per step, shared by every projection)."""
        assert self.host is not None
        mask = self._slot_masks.get((num_slots, dtype))
        if mask is None:
            columns = torch.arange(num_slots, device=self.host.token_slots.device)
            mask = (self.host.token_slots[:, None] == columns[None, :]).to(dtype)
            self._slot_masks[(num_slots, dtype)] = mask
        return mask


class LoraLinear(nn.Module):
    def __init__(self, in_features: int, out_slices: list[int], slice_names: list[str], bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_slices = list(out_slices)
        self.slice_names = list(slice_names)
        self.slice_offsets = [sum(out_slices[:i]) for i in range(len(out_slices))]
        out_features = sum(out_slices)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # Set by `use_quantized`: one prepared low-bit weight per slice replaces `weight`.
        self.quantized: list[PreparedQuantLinear] | None = None
        self.lora_a: list[torch.Tensor] = []
        self.stacked_a: torch.Tensor | None = None  # [S, n_slices * R, in]; lora_a[i] are its views
        self.lora_b: list[torch.Tensor] = []
        self.slot_ranks: torch.Tensor | None = None  # int32 [n_slices, S]
        self.slot_scales: torch.Tensor | None = None  # float32 [n_slices, S]
        # Set by `fuse_lora_expand` (narrow dense weights on the CPU): [W | scaled B pools].
        self.fused: FusedExpandWeight | None = None
        # Set by `pack_weight` when not fused: the base, packed for oneDNN.
        self.packed: PackedDenseWeight | None = None
        # The CPU's copy of the loaded slots at their real ranks (kernels/lora_compact_cpu.py),
        # and the pools' version counters it was built at: any in-place write to a pool (a
        # slot load, or a benchmark filling the pools) makes the next forward rebuild it.
        self._compact: CompactLoraPools | None = None
        self._compact_versions: tuple[int, ...] = ()
        # Slots `load_slot` wrote since then, and the versions right after its last write: when
        # nothing else wrote, only those slots are rewritten (`update_compact_slots`).
        self._loaded_slots: set[int] = set()
        self._versions_after_load: tuple[int, ...] = ()
        # The pools bound for the native LoRA kernel (kernels/lora_native.py), made on first use.
        self._native: NativeLoraPools | None = None
        # float16 copies of the pools the native kernel reads for slots whose adapter was stored
        # in float16 (`load_slot` makes them at the first such adapter, where they pay), and
        # the pools' versions after the last `load_slot`: a write by anything else leaves the
        # copies stale, and they are then dropped (`_native_pools`).
        self.half_pools: HalfPools | None = None
        self._half_versions: tuple[int, ...] = ()
        self._half_copies_allowed = False  # set by `allocate_lora`

    # ------------------------------------------------------------------ set-up
    def use_quantized(self, prepared: list[PreparedQuantLinear]) -> None:
        """One prepared weight per slice, or one for all slices concatenated along N."""
        widths = [p.out_features for p in prepared]
        if widths != self.out_slices and widths != [sum(self.out_slices)]:
            raise ValueError(f"quantized slices of widths {widths} do not make up {self.out_slices}")
        self.quantized = prepared
        self.fused = self.packed = None  # their copies of the dense base would be stale
        self.weight = None  # type: ignore[assignment]
        self.bias = None  # each prepared slice adds its own bias

    def allocate_lora(self, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        # One tensor holds every slice's A pool, so the CPU path can shrink all slices of a
        # fused projection in one matmul; lora_a[i] is slice i's [S, R, in] view of it.
        n_slices = len(self.out_slices)
        self.stacked_a = torch.zeros(num_slots, n_slices * max_rank, self.in_features, dtype=dtype, device=device)
        self.lora_a = [self.stacked_a[:, i * max_rank : (i + 1) * max_rank] for i in range(n_slices)]
        # B pools are stored [S, R, N] and handed out as [S, N, R] views: the CPU's masked
        # path then reads all slots' B of a slice as one [S * R, N] matrix without a copy.
        self.lora_b = [
            torch.zeros(num_slots, max_rank, n, dtype=dtype, device=device).transpose(1, 2) for n in self.out_slices
        ]
        self.slot_ranks = torch.zeros(len(self.out_slices), num_slots, dtype=torch.int32, device=device)
        self.slot_scales = torch.zeros(len(self.out_slices), num_slots, dtype=torch.float32, device=device)
        # A decode step's LoRA work on the CPU is bound by reading each distinct adapter's A and B
        # once; adapters stored in float16 (PEFT's usual export) are read from float16 copies
        # at half the bytes, with the same float32 sums (kernels/lora_native.c). The float32
        # pools stay the reference every other route reads. The copies cost half the pools'
        # memory again (352 MB in `make run`), so they are made when the first float16 adapter
        # loads: a server of float32 adapters (`train-adapter`'s own saves) never holds them.
        self.half_pools = None
        self._half_copies_allowed = (device.type == "cpu" and dtype == torch.float32 and native_half_copies_worth_it()
                                     and native_pools_fit(self.stacked_a, self.lora_b))

    def fuse_lora_expand(self, pack: bool = True) -> bool:
        """Fold the LoRA expand into the base matmul when the base is a dense weight stored
        narrower than the activations on the CPU (see lora_fused.py); call after
        `allocate_lora`, before any `load_slot`; `pack`: multiply through oneDNN-packed copies
        (kernels/dense_cpu.py). Returns whether it did. `weight` then views
        the fused matrix: replace the base only through `use_quantized`, which drops it."""
        if self.quantized is not None or self.stacked_a is None or self.weight.device.type != "cpu":
            return False
        num_slots, columns, _ = self.stacked_a.shape
        max_rank = columns // len(self.out_slices)
        if self.weight.dtype == self.stacked_a.dtype or not FusedExpandWeight.worth_it(
            self.in_features, len(self.out_slices), num_slots, max_rank
        ):
            return False
        self.fused = FusedExpandWeight(self.weight.data, self.slice_offsets, num_slots, max_rank, pack)
        self.weight.data = self.fused.weight
        self.packed = None
        return True

    def pack_weight(self) -> None:
        """Multiply a dense float32/bf16 base on the CPU through a oneDNN-packed copy
        (kernels/dense_cpu.py). A fused base packs itself; call after `fuse_lora_expand`.
        `weight` must then change only through `use_quantized`."""
        if self.quantized is None and self.fused is None and packing_supported(self.weight):
            self.packed = PackedDenseWeight(self.weight.data)

    def load_slot(self, slot: int, slice_weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  scale: float | Mapping[str, float]) -> None:
        """Copy one adapter's A [r, in] / B [out, r] per slice name into `slot`, with its LoRA
        scale: one for every slice, or one per slice name (PEFT's alpha_pattern / rank_pattern)."""
        assert self.slot_ranks is not None and self.slot_scales is not None
        if self._pool_versions() != (self._versions_after_load if self._loaded_slots else self._compact_versions):
            self._compact = None  # something else wrote the pools since: the next forward rebuilds in full
        if self.fused is not None:
            self.fused.clear_slot(slot)
        # The slot is read from the copies only if every slice's weights were float16 (then the
        # copies hold exactly the pools' values); any other dtype keeps it on the float32 pools.
        all_half = bool(slice_weights) and all(a.dtype == b.dtype == torch.float16 for a, b in slice_weights.values())
        if all_half and self.half_pools is None and self._half_copies_allowed:
            self.half_pools = HalfPools.like(self.stacked_a, self.lora_b)  # every flag 0: no slot reads them yet
            self._half_versions = self._pool_versions()
            self._native = None  # rebound with the copies on the next forward
        half = self.half_pools
        if half is not None and self._half_versions != self._pool_versions():
            half.slot_half.zero_()  # something else wrote the pools: no copy can be trusted
        from_half = half is not None and all_half
        if half is not None:
            half.slot_half[slot] = 0
        for index, name in enumerate(self.slice_names):
            a_slot, b_slot = self.lora_a[index][slot], self.lora_b[index][slot]  # [R, in], [out, R]
            if name not in slice_weights:
                a_slot.zero_()
                b_slot.zero_()
                self.slot_ranks[index, slot] = 0
                self.slot_scales[index, slot] = 0.0
                continue
            a, b = slice_weights[name]
            rank = a.shape[0]
            a_slot[:rank].copy_(a)  # converts to the pools' dtype
            b_slot[:, :rank].copy_(b)
            a_slot[rank:].zero_()  # past the rank: zeros, whatever the slot held before
            b_slot[:, rank:].zero_()
            slice_scale = scale if isinstance(scale, (int, float)) else scale[name]
            self.slot_ranks[index, slot] = rank
            self.slot_scales[index, slot] = slice_scale
            if self.fused is not None:  # scales B in the pools' dtype, as the masked route does
                dtype = self.lora_a[index].dtype
                self.fused.write_slice(slot, index, a.to(dtype), b.to(dtype), slice_scale)
            if from_half:
                rows = slice(index * a_slot.shape[0], index * a_slot.shape[0] + rank)
                half.stacked_a[slot, rows].copy_(a)
                half.b_pools[index][slot, :, :rank].copy_(b)
        if from_half:
            half.slot_half[slot] = 1  # the copies' rows past each rank are never read (ranks bound them)
        self._loaded_slots.add(slot)
        self._versions_after_load = self._half_versions = self._pool_versions()

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor, lora: LoraBatch | None, prompt_rows_start: int | None = None) -> torch.Tensor:
        """x [T, in] -> base + each token's LoRA, [T, out]. prompt_rows_start: rows from it on
        are prompt tokens (ForwardBatch); a low-bit base multiplies them by its prefill route."""
        if self.fused is not None and lora is not None and lora.host is not None and (
            lora.host.num_tokens * self.fused.num_slots <= MAX_TOKEN_SLOTS
        ):
            y = self.fused.forward(x, lora.slot_mask(self.fused.num_slots, self.fused.combined.dtype)).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if self.quantized is None:
            if self.fused is not None or self.packed is not None:
                x_as_weight = x.to(self.weight.dtype)  # the packed/fused matmuls take one dtype
                base = self.fused.base(x_as_weight) if self.fused is not None else self.packed.linear(x_as_weight)
                y = base.to(x.dtype)
                if self.bias is not None:
                    y += self.bias
            elif self.weight.dtype == x.dtype:
                y = F.linear(x, self.weight, self.bias)
            else:  # weights stored narrower than the activations (EngineConfig.weight_dtype)
                y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
                if self.bias is not None:
                    y += self.bias
        else:
            outputs = [self._quantized_matmul(x, prepared, prompt_rows_start) for prepared in self.quantized]
            y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if lora is not None and self.slot_ranks is not None:
            lora_apply(
                y,
                x,
                self.lora_a,
                self.lora_b,
                self.slice_offsets,
                lora.segment_starts,
                lora.segment_slots,
                self.slot_ranks,
                self.slot_scales,
                segments=lora.host,
                stacked_a=self.stacked_a,
                # Built (or brought up to date) only when a step takes the masked route.
                compact=self._compact_pools if lora.host is not None else None,
                native=self._native_pools(x) if lora.host is not None else None,
            )
        return y

    @staticmethod
    def _quantized_matmul(x: torch.Tensor, prepared: PreparedQuantLinear, prompt_rows_start: int | None) -> torch.Tensor:
        """Decode rows and prompt rows through their own routes, where that changes a route:
        prompt rows take the bf16 route from fewer rows than decode rows do (quant_matmul)."""
        if prompt_rows_start is None or x.shape[0] - prompt_rows_start < prepared.prefill_dense_min_m:
            return quant_matmul(x, prepared)  # one route for all rows either way
        if prompt_rows_start == 0:
            return quant_matmul(x, prepared, prefill=True)
        # Both routes write their rows of one output: no concatenation copying the whole of it.
        y = torch.empty(x.shape[0], prepared.out_features, dtype=x.dtype, device=x.device)
        quant_matmul(x[:prompt_rows_start], prepared, out=y[:prompt_rows_start])
        quant_matmul(x[prompt_rows_start:], prepared, prefill=True, out=y[prompt_rows_start:])
        return y

    def _native_pools(self, x: torch.Tensor) -> NativeLoraPools | None:
        """The pools bound once for the native LoRA kernel, where it built and the pools fit it
        (fp32 on the CPU, rank at most its MAX_RANK); None: lora_apply keeps torch's routes."""
        if self._native is None or self._native.stacked_a is not self.stacked_a:
            if not (x.device.type == "cpu" and native_lora_available() and native_pools_fit(self.stacked_a, self.lora_b)):
                return None
            self._native = NativeLoraPools(self.stacked_a, self.lora_b, self.slice_offsets, self.slot_ranks,
                                           self.slot_scales, self.half_pools)
        if self.half_pools is not None and self._half_versions != self._pool_versions():
            self.half_pools.slot_half.zero_()  # the float32 pools were written outside `load_slot`
            self._half_versions = self._pool_versions()
        return self._native

    def _pool_versions(self) -> tuple[int, ...]:
        return tuple(pool._version for pool in (self.stacked_a, *self.lora_b, self.slot_ranks, self.slot_scales))

    def _compact_pools(self) -> CompactLoraPools:
        versions = self._pool_versions()
        if self._compact is None or versions != self._compact_versions:
            updated = None
            if self._compact is not None and self._loaded_slots and versions == self._versions_after_load:
                updated = update_compact_slots(self._compact, self.stacked_a, self.lora_b, self.slot_ranks,
                                               self.slot_scales, self._loaded_slots)
            self._compact = updated or build_compact_pools(self.stacked_a, self.lora_b, self.slot_ranks,
                                                           self.slot_scales)
            self._compact_versions = self._pool_versions()  # an in-place update wrote no pool
            self._loaded_slots = set()
        return self._compact


def load_adapter_tensors(spec: AdapterSpec, num_layers: int,
                         data: bytes | None = None) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Read an adapter's safetensors into {(layer, projection): (A [r, in], B [out, r])}.

    Into memory of this process, read once: `load_file` maps the file, and its tensors (the
    executor's host copy) then changed with a file rewritten in place — the copy of a served
    adapter became another's bytes (an outside probe's garbage tokens) — or faulted (SIGBUS)
    on one truncated. `data`: the file's bytes, already read."""
    path = Path(spec.path) / WEIGHTS_FILE
    try:
        tensors = load_safetensors(path.read_bytes() if data is None else data)
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"adapter {spec.name!r}: cannot read {path}: {error}") from error
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise AdapterError(f"adapter {spec.name!r}: unsupported tensor {key!r:.120} (only LoRA A/B of "
                               f"projections, keyed as PEFT saves them: {LORA_KEY_FORM})")
        layer, projection, half = parsed
        if layer >= num_layers:
            raise AdapterError(f"adapter {spec.name!r}: tensor {key!r} names layer {layer}; the model has {num_layers}")
        halves.setdefault((layer, projection), {})[half] = tensor
    result: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, projection), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {spec.name!r}: layer {layer} {projection} lacks lora_A or lora_B")
    # NaN or infinite weights refused (a task's answers would be garbage; and the CPU's compact
    # route takes its fast multiply-by-0 form only on finite pools). One max |w| per tensor (NaN propagates through it), one
    # check of them all: ~8 ms an adapter of 420 tensors, against ~70 ms of isfinite + all each.
    peaks = torch.stack([t.abs().amax().float() if t.numel() else torch.zeros(()) for pair in halves.values()
                         for t in (pair["A"], pair["B"])])
    finite = torch.isfinite(peaks).view(-1, 2).all(dim=1).tolist()
    for ((layer, projection), _), ok in zip(halves.items(), finite):
        if not ok:
            raise AdapterError(f"adapter {spec.name!r}: layer {layer} {projection} holds NaN or infinite weights")
    for (layer, projection), pair in halves.items():
        a, b = pair["A"], pair["B"]
        if a.shape[0] != (rank := spec.rank_at(layer, projection)) or b.shape[1] != rank:
            raise AdapterError(
                f"adapter {spec.name!r}: layer {layer} {projection} has rank {a.shape[0]}/{b.shape[1]}, "
                f"adapter_config.json says {spec.rank_words(rank)}"
            )
        result[(layer, projection)] = (a, b)
    if not result:
        raise AdapterError(f"adapter {spec.name!r}: {path} holds no LoRA weights")
    return result


def install_adapter(
    model_linears: dict[tuple[int, str], tuple[LoraLinear, int]],
    spec: AdapterSpec,
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    slot: int,
    max_rank: int,
) -> None:
    """Copy an adapter into `slot` of every LoraLinear of the model.

    model_linears maps (layer, projection name) to (its LoraLinear, slice index).
    """
    if (used := max((a.shape[0] for a, _ in tensors.values()), default=0)) > max_rank:
        raise AdapterError(f"adapter {spec.name!r}: rank {used} exceeds the pool's max rank {max_rank}")
    per_module: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    scales: dict[int, dict[str, float]] = {}  # per module: rank_pattern / alpha_pattern give each its own
    for (layer, projection), (a, b) in tensors.items():
        linear, slice_index = model_linears[(layer, projection)]
        expected_out = linear.out_slices[slice_index]
        if a.shape[1] != linear.in_features or b.shape[0] != expected_out:
            raise AdapterError(
                f"adapter {spec.name!r} was trained for another base model: layer {layer} {projection} "
                f"has A {tuple(a.shape)} / B {tuple(b.shape)}, this model needs in={linear.in_features}, out={expected_out}"
            )
        # As stored (fp16 for the committed adapters): `load_slot`'s copies convert on the way.
        per_module.setdefault(id(linear), {})[projection] = (a, b)
        scales.setdefault(id(linear), {})[projection] = spec.scale_at(layer, projection)
    seen = {id(linear): linear for linear, _ in model_linears.values()}
    for key, linear in seen.items():
        # Modules the adapter does not target get rank 0 in this slot (skipped by the kernels).
        linear.load_slot(slot, per_module.get(key, {}), scales.get(key, {}))
