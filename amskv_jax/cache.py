"""The KV cache: a static slot layout per layer and the pytree of buffers it describes.

Generation runs one scale at a time. Scale `si`'s queries attend to (a) the K/V already in the cache, restricted to
the earlier scales the policy lets them read, and (b) their own fresh K/V, passed in directly. Only afterwards are
the scale's K/V written, and only if a later scale reads them. Because the whole schedule is known before tracing,
every slot's content at every step is a compile-time fact:

* `LayerLayout` says, per scale, which earlier scales its queries read (`reads`) and where its own tokens go
  (`writes`, contiguous segments of slots). Slots whose scale no later query reads are masked, never freed, and
  reused by the next write, so a layer's `capacity` is the most tokens it must hold at once, not the token count.
* Layers with the same `LayerLayout` form a *kind* (`CacheLayout.kinds`, `kind_of`, `kind_index`). `KVCache` holds
  one `KindCache` per kind: plain data, `k`, `v` buffers of the kind's capacity stacked over its layers, and
  `slot_scale`, the scale each slot holds (-1 when empty). `KindCache.layer(i)` is one layer's `LayerCache`. A
  query's mask is `slot_scale ∈ reads[si]`, so a stale slot can never be read even though its bytes stay. Kinds
  keep the bytes exact (no layer is padded to another's capacity) while the model scans over its layers.
* Quantised storage (`init_cache(..., kv_dtype="int8" | "float8_e4m3fn" | "int4" | "int2")`, see `quant.py`) adds
  float32 scales, one `quant.KVScales` value: V's per slot and head, K's per channel for each written scale
  ("group"), and for int4 / int2 their minima; int4 / int2 codes are packed into uint8 along the head dim. Groups
  are planned like slots (`LayerLayout.group(si)`, `group_capacity`, `slot_groups(si)`): a scale's group is reused
  once no later query reads that scale.
* Floats narrower than 32 bits (bfloat16, float16, float8 codes) are stored as their bits, unsigned integers of
  their width (`bits_dtype`); `KindCache.layer` reads them back as the floats they are. See `bits_dtype` for why.

Layouts are frozen and hashable: they are `jax.jit` static arguments. Policies (`policies.py`) build them.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from amskv_jax import quant
from amskv_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Segment:
    """Write tokens [token, token + length) of a scale into slots [slot, slot + length)."""

    slot: int
    token: int
    length: int


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """One layer's static slot plan. `reads[si]`: earlier scales scale si reads; `writes[si]`: its segments.
    kv_dtype: the layer's own storage dtype (`quant.KV_DTYPES`; per-layer precision), None for the cache's.
    low: a second, low-precision tier (MiKV on scales, `policies.MiKV`): its own slot plan and storage for the
    earlier scales this plan does not read, so that scale si's queries read `reads[si]` here and `low.reads[si]`
    there (disjoint); None without one."""

    capacity: int
    reads: tuple[tuple[int, ...], ...]
    writes: tuple[tuple[Segment, ...], ...]
    kv_dtype: str | None = None
    low: LayerLayout | None = None

    def storage(self, kv_dtype: str | None) -> str | None:
        """The dtype this layer's K/V are stored in when the cache's is `kv_dtype`: its own, if it has one."""
        return kv_dtype if self.kv_dtype is None else self.kv_dtype

    @functools.cached_property
    def _slot_scales(self) -> np.ndarray:
        """int32 [S, capacity]: the scale each slot holds while scale si attends (before si writes); -1 empty."""
        held = np.full(self.capacity, -1, np.int32)
        out = []
        for si, segments in enumerate(self.writes):
            out.append(held.copy())
            for seg in segments:
                held[seg.slot : seg.slot + seg.length] = si
        return np.stack(out) if out else np.zeros((0, self.capacity), np.int32)

    def slot_scales(self, si: int) -> np.ndarray:
        return self._slot_scales[si]

    def read_mask(self, si: int) -> np.ndarray:
        """bool [capacity]: the slots scale si's queries may read (static; kernels use it to skip blocks)."""
        return np.isin(self._slot_scales[si], self.reads[si])

    def written(self, si: int) -> bool:
        return bool(self.writes[si])

    @functools.cached_property
    def _groups(self) -> tuple[int, tuple[int, ...]]:
        """(group capacity, the K-scale group of every scale, -1 if unwritten): a written scale takes the lowest
        group whose scale no query at or after si reads (as slots are reused), else a new one."""
        n = len(self.writes)
        last_reader = [max((t for t, r in enumerate(self.reads) if s in r), default=-1) for s in range(n)]
        owner: list[int] = []  # group -> the scale it holds
        group = [-1] * n
        for si in range(n):
            if not self.writes[si]:
                continue
            free = [g for g, s in enumerate(owner) if last_reader[s] <= si]
            if free:
                group[si] = free[0]
                owner[free[0]] = si
            else:
                group[si] = len(owner)
                owner.append(si)
        return len(owner), tuple(group)

    @property
    def group_capacity(self) -> int:
        """The most K-scale groups (written scales) live at once: k_scale's second dimension."""
        return self._groups[0]

    def group(self, si: int) -> int:
        """The K-scale group scale si's per-channel scales are written to (-1 when si is not written)."""
        return self._groups[1][si]

    def slot_groups(self, si: int) -> np.ndarray:
        """int32 [capacity]: the group of the scale each slot holds while scale si attends (0 for empty slots).

        Exact for every slot si may read: a group is reused only by a write after its scale's last reader."""
        groups = np.asarray(self._groups[1] + (0,), np.int32)  # index -1 (empty) -> 0
        return groups[self._slot_scales[si]] if self.capacity else np.zeros(0, np.int32)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The static plan of the whole cache: one `LayerLayout` per transformer block."""

    patch_nums: tuple[int, ...]
    layers: tuple[LayerLayout, ...]
    policy: str  # a readable description of the policy that built it

    @property
    def capacities(self) -> tuple[int, ...]:
        """Each layer's slots (tokens per row it can hold), a low-precision tier's included."""
        return tuple(layer.capacity + (layer.low.capacity if layer.low else 0) for layer in self.layers)

    @functools.cached_property
    def kinds(self) -> tuple[LayerLayout, ...]:
        """The distinct layer layouts, in order of first appearance: layers of one kind share a stacked cache."""
        return tuple(dict.fromkeys(self.layers))

    @functools.cached_property
    def kind_of(self) -> tuple[int, ...]:
        """Each layer's kind (an index into `kinds`)."""
        return tuple(self.kinds.index(layer) for layer in self.layers)

    @functools.cached_property
    def kind_index(self) -> tuple[int, ...]:
        """Each layer's index within its kind's stack (layers keep their order)."""
        return tuple(self.kind_of[:i].count(kind) for i, kind in enumerate(self.kind_of))

    @property
    def kind_sizes(self) -> tuple[int, ...]:
        """How many layers each kind has."""
        return tuple(self.kind_of.count(j) for j in range(len(self.kinds)))

    @property
    def group_capacities(self) -> tuple[int, ...]:
        return tuple(layer.group_capacity for layer in self.layers)

    def storages(self, kv_dtype: str | None) -> tuple[str | None, ...]:
        """Each layer's storage dtype when the cache's is `kv_dtype` (`LayerLayout.storage`)."""
        return tuple(layer.storage(kv_dtype) for layer in self.layers)


def teacher_mask(layout: CacheLayout) -> np.ndarray:
    """bool [kinds, L, L], per kind of `layout.kinds`: token t may attend token u iff u's scale is t's own or one of
    those t's scale reads at that kind (`reads[level[t]]`, or its low-precision tier's), what cached generation
    under the layout attends to. The full cache's is the block-causal mask."""
    return np.stack([_pairs(layout.patch_nums, plan, own=True) | _pairs(layout.patch_nums, plan.low)
                     for plan in layout.kinds])


def teacher_low_mask(layout: CacheLayout) -> np.ndarray | None:
    """bool [kinds, L, L]: the pairs of `teacher_mask` read from a low-precision tier (`LayerLayout.low`); None
    when no layer has one."""
    if all(plan.low is None for plan in layout.kinds):
        return None
    return np.stack([_pairs(layout.patch_nums, plan.low) for plan in layout.kinds])


def low_storage(layout: CacheLayout) -> str | None:
    """The storage dtype of the layout's low-precision tiers (one for all of them), None without any."""
    storages = {plan.low.kv_dtype for plan in layout.layers if plan.low is not None}
    if len(storages) > 1:
        raise UserError(f"low-precision tiers in several storages {sorted(storages)}; one per layout")
    return storages.pop() if storages else None


def _pairs(patch_nums: tuple[int, ...], plan: LayerLayout | None, own: bool = False) -> np.ndarray:
    """bool [L, L]: token t reads token u under `plan` (u's scale in reads[level[t]], or its own when `own`)."""
    level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(patch_nums)])
    reads_SS = np.eye(len(patch_nums), dtype=bool) if own else np.zeros((len(patch_nums),) * 2, bool)
    for si, scales in enumerate(() if plan is None else plan.reads):
        reads_SS[si, list(scales)] = True
    return reads_SS[level[:, None], level[None, :]]


def with_low_tier(layout: CacheLayout, low: CacheLayout, policy: str) -> CacheLayout:
    """`layout` with each layer's `low` tier from `low` (same depth and ladder; layers of `low` that hold nothing
    add no tier). Each query's reads in the two must be disjoint."""
    if len(layout.layers) != len(low.layers) or layout.patch_nums != low.patch_nums:
        raise ValueError("a low-precision tier needs the layout's depth and ladder")
    layers = []
    for plan, tier in zip(layout.layers, low.layers, strict=True):
        if any(set(a) & set(b) for a, b in zip(plan.reads, tier.reads, strict=True)):
            raise ValueError("a scale read from both tiers")
        layers.append(dataclasses.replace(plan, low=tier if tier.capacity else None))
    return CacheLayout(patch_nums=layout.patch_nums, layers=tuple(layers), policy=policy)


def build_layout(
    reads: Callable[[int, int], tuple[int, ...]], depth: int, patch_nums: tuple[int, ...], policy: str,
    kv_dtypes: tuple[str | None, ...] | None = None,
) -> CacheLayout:
    """Plan slots for every layer from `reads(layer, si)` (the earlier scales scale si's queries read) and, with
    `kv_dtypes`, each layer's own storage dtype (per-layer precision; None: the cache's).

    A scale is written only if a later scale reads it. When scale si writes, the slots of every scale that no query
    after si reads are free (si itself has just read them), and si fills free slots in ascending order, as few
    contiguous segments as that gives. Capacity is the most tokens live at once, which the allocator never exceeds.
    """
    sizes = [pn * pn for pn in patch_nums]
    kv_dtypes = (None,) * depth if kv_dtypes is None else tuple(kv_dtypes)
    if len(kv_dtypes) != depth:
        raise UserError(f"per-layer storage dtypes for {len(kv_dtypes)} layers, but the model has {depth}")
    for kv_dtype in kv_dtypes:
        quant.check_kv_dtype(kv_dtype)
    layers = []
    for layer in range(depth):
        reads_l = tuple(tuple(sorted(set(reads(layer, si)))) for si in range(len(sizes)))
        for si, r in enumerate(reads_l):
            if any(not 0 <= s < si for s in r):
                raise UserError(f"layer {layer}, scale {si}: may only read earlier scales, got {r}")
        last_reader = [max((si for si, r in enumerate(reads_l) if s in r), default=-1) for s in range(len(sizes))]
        live = [
            sum(sizes[s] for s in range(si + 1) if last_reader[s] > si) for si in range(len(sizes))
        ]
        capacity = max(live, default=0)
        held = np.full(capacity, -1, np.int32)
        writes = []
        for si, n in enumerate(sizes):
            if last_reader[si] <= si:
                writes.append(())
                continue
            expired = np.isin(held, [s for s in range(si) if last_reader[s] <= si])
            free = np.flatnonzero((held == -1) | expired)[:n]
            held[free] = si
            writes.append(_segments(free))
        layers.append(LayerLayout(capacity=capacity, reads=reads_l, writes=tuple(writes), kv_dtype=kv_dtypes[layer]))
    return CacheLayout(patch_nums=tuple(patch_nums), layers=tuple(layers), policy=policy)


def _segments(slots: np.ndarray) -> tuple[Segment, ...]:
    """Group ascending slot indices into contiguous runs, token offsets following along."""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    out, token = [], 0
    for run in np.split(slots, breaks):
        out.append(Segment(slot=int(run[0]), token=token, length=len(run)))
        token += len(run)
    return tuple(out)


@flax.struct.dataclass
class LayerCache:
    """One layer's buffers (a view of its kind's stack, `KindCache.layer`). k, v: [rows, capacity, H, Dh] (k
    L2-normalised, as the reference caches it; int4 / int2: uint8 [rows, capacity, H, Dh / P], packed codes);
    slot_scale: int32 [capacity], the scale each slot holds, -1 when empty. Quantised storage only (else None):
    scales, the `quant.KVScales` of k and v. low: the low-precision tier's buffers (`LayerLayout.low`), or None."""

    k: jax.Array
    v: jax.Array
    slot_scale: jax.Array
    scales: quant.KVScales | None = None
    low: LayerCache | None = None

    def read_mask(self, reads: tuple[int, ...]) -> jax.Array:
        """bool [capacity]: slots holding one of the scales in `reads`."""
        if not reads:
            return jnp.zeros(self.slot_scale.shape, bool)
        return (self.slot_scale[:, None] == jnp.asarray(reads, jnp.int32)[None, :]).any(-1)


def bits_dtype(dtype) -> np.dtype:
    """The dtype a stack stores values of `dtype` in: a float narrower than 32 bits as the unsigned integer of its
    width (its bits), anything else as itself.

    Why: XLA:CPU computes 16- and 8-bit float selects in float32, so a scanned layer loop's masked write
    (`KindCache.write(active=...)`) on a bfloat16 stack compiled to convert(update(convert(stack))), a copy of the
    whole stack per write. On integer bits the select and the update stay in the stack's buffer. Bitcasts are free."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return np.dtype(f"uint{8 * dtype.itemsize}")
    return dtype


def masked_scatter(buffer: jax.Array, lead: tuple, pieces: list, active: jax.Array) -> jax.Array:
    """buffer with pieces (update [1, (rows,) length, ...], slot) put at buffer[lead..., slot:slot + length, ...]
    where `active`, else what those slots hold: one gather of every piece's held slots, one scatter of the chosen
    values. lead: the layer index (and the first row), the slot axis after them. The pieces come in ascending slot
    order (`build_layout` fills free slots ascending), so the indices are sorted and unique, as the gather and the
    scatter are promised. One read, then one write that the read feeds, so XLA orders the two and updates the buffer
    in place; written piece by piece, or as the layer's rows read whole, it copied the stack (bench/RESULTS.md,
    Issue 24)."""
    axis = len(lead)
    slots = np.concatenate([np.arange(slot, slot + update.shape[axis]) for update, slot in pieces])
    assert (np.diff(slots) > 0).all(), f"pieces must come in ascending slot order, got slots {slots.tolist()}"
    update = jnp.concatenate([u[0] for u, _ in pieces], axis=axis - 1)
    update = jnp.moveaxis(update, axis - 1, 0)  # [slots, (rows,) ...]
    starts = jnp.stack([jnp.broadcast_to(jnp.asarray(x, jnp.int32), slots.shape) for x in lead]
                       + [jnp.asarray(slots, jnp.int32)], axis=1)
    window = tuple(d for d in range(buffer.ndim) if d not in (0, axis))
    sizes = tuple(1 if d in (0, axis) else update.shape[1 + window.index(d)] for d in range(buffer.ndim))
    held = jax.lax.gather(
        buffer, starts, jax.lax.GatherDimensionNumbers(
            offset_dims=tuple(range(1, update.ndim)), collapsed_slice_dims=(0, axis),
            start_index_map=tuple(range(axis + 1))),
        sizes, indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")
    return jax.lax.scatter(
        buffer, starts, jnp.where(active, update, held), jax.lax.ScatterDimensionNumbers(
            update_window_dims=tuple(range(1, update.ndim)), inserted_window_dims=(0, axis),
            scatter_dims_to_operand_dims=tuple(range(axis + 1))),
        indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")


@flax.struct.dataclass
class KindCache:
    """The stacked buffers of the n layers of one kind (one `LayerLayout`): `LayerCache`'s fields with a leading
    layer axis. k, v: [n, rows, capacity, H, Dh or Dh / P], values of `dtype` stored as `bits_dtype(dtype)`;
    slot_scale: int32 [n, capacity]; quantised only: scales, the stacked `quant.KVScales`. dtype (static): what K
    and V hold (the compute dtype, or the quantised storage's codes). low: the layers' low-precision tier
    (`LayerLayout.low`), a KindCache of its own plan and storage, or None. `write` and `mark` act on this tier; the
    low one is written by its own calls."""

    k: jax.Array
    v: jax.Array
    slot_scale: jax.Array
    dtype: np.dtype = flax.struct.field(pytree_node=False)
    scales: quant.KVScales | None = None
    low: KindCache | None = None

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def layer(self, index, rows: tuple | None = None) -> LayerCache:
        """Layer `index` (an int or a traced int32) of the stack; `rows` (start, count): only those rows (start may
        be traced)."""

        def take(x):
            x = jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False)
            return x if rows is None or x.ndim == 1 else jax.lax.dynamic_slice_in_dim(x, rows[0], rows[1], 0)

        def values(x):
            return jax.lax.bitcast_convert_type(take(x), self.dtype)

        return LayerCache(k=values(self.k), v=values(self.v), slot_scale=take(self.slot_scale),
                          scales=jax.tree.map(take, self.scales),
                          low=None if self.low is None else self.low.layer(index, rows))

    def write(
        self, index, segments: tuple[Segment, ...], si: int, k_BlHD: jax.Array, v_BlHD: jax.Array,
        group: int | None = None, active: jax.Array | None = None, row=0, mark: bool = True,
    ) -> KindCache:
        """Store scale si's tokens into layer `index`'s planned segments: only those slots are updated
        (`dynamic_update_slice` at static slot offsets; in place under jit).

        Quantised storage quantises here (K per channel over the scale's tokens, into K-scale group `group`, the
        layout's `LayerLayout.group(si)`; V per token); `group` is unused otherwise. `active` (a traced bool; None:
        always) writes the new tokens where it is true and writes back what the segments hold where it is false: a
        scanned layer loop writes every kind's stack at every layer (no `lax.switch` branch returns a stack, which
        would make XLA copy it), and this costs a segment-sized read and write, not a copy of the stack. `row` (an int
        or a traced int32): the first cache row the tokens' rows go to (a chunk of rows, `VAR.step(row_chunk=...)`).
        `mark=False` leaves `slot_scale` as it is, for `mark` to set once every row is written (a later chunk of rows
        still reads the slots by what they held before the scale)."""
        k, v, slot_scale, scales = self.k, self.v, self.slot_scale, self.scales
        index, row = jnp.asarray(index, jnp.int32), jnp.asarray(row, jnp.int32)

        def put(buffer, pieces):
            """pieces, (update [rows, length, ...], slot) each, into buffer[index, row:row + rows, slot:slot + length]
            (slot_scale: update [length] into buffer[index, slot:slot + length]), where `active` (None: no buffer).

            Where `active` is false the slots get back what they hold; several pieces (a scale whose free slots are
            not one run) then take one gather and one scatter (`masked_scatter`)."""
            if buffer is None or not pieces:
                return buffer
            lead = (index,) if buffer.ndim == 2 else (index, row)  # then the slot axis, then whole trailing axes
            tail = (0,) * (buffer.ndim - len(lead) - 1)
            updates = [(update[None].astype(buffer.dtype), slot) for update, slot in pieces]
            if active is not None:
                if len(updates) > 1:
                    return masked_scatter(buffer, lead, updates, active)
                (update, slot), = updates
                held = jax.lax.dynamic_slice(buffer, lead + (slot,) + tail, update.shape)
                updates = [(jnp.where(active, update, held), slot)]
            for update, slot in updates:
                start = lead + (slot,) + tail
                if buffer.shape[0] == 1:
                    # A one-layer stack is written as its layer: XLA rewrites the stack's update without the unit
                    # axis anyway, and given the stack it copied the buffer once (bench/RESULTS.md, Issue 24).
                    buffer = jax.lax.dynamic_update_slice(buffer[0], update[0], start[1:])[None]
                else:
                    buffer = jax.lax.dynamic_update_slice(buffer, update, start)
            return buffer

        if self.quantized:
            if group is None or not 0 <= group < scales.k.shape[2]:
                raise ValueError(f"a quantised cache needs the scale's K-scale group in [0, {scales.k.shape[2]}), "
                                 f"got {group}")
            k_BlHD, k_scale_BHD, k_min_BHD = quant.quantize_k(k_BlHD, scales.kv_dtype)
            v_BlHD, v_scale_BlH, v_min_BlH = quant.quantize_v(v_BlHD, scales.kv_dtype)
            scales = scales.replace(
                k=put(scales.k, [(k_scale_BHD[:, None], group)]),
                k_min=put(scales.k_min, None if k_min_BHD is None else [(k_min_BHD[:, None], group)]),
            )
        k_BlHD, v_BlHD = (jax.lax.bitcast_convert_type(x.astype(self.dtype), k.dtype) for x in (k_BlHD, v_BlHD))

        def pieces(tokens):
            return None if tokens is None else [(tokens[:, seg.token:seg.token + seg.length], seg.slot)
                                                for seg in segments]

        k, v = put(k, pieces(k_BlHD)), put(v, pieces(v_BlHD))
        if self.quantized:
            scales = scales.replace(v=put(scales.v, pieces(v_scale_BlH)), v_min=put(scales.v_min, pieces(v_min_BlH)))
        if mark:
            slot_scale = put(slot_scale, [(jnp.full((seg.length,), si, jnp.int32), seg.slot) for seg in segments])
        return self.replace(k=k, v=v, slot_scale=slot_scale, scales=scales)

    def mark(self, segments: tuple[Segment, ...], si: int) -> KindCache:
        """Mark the segments' slots as holding scale si in every layer of the stack (after `write(mark=False)`)."""
        slot_scale = self.slot_scale
        for seg in segments:
            slot_scale = slot_scale.at[:, seg.slot : seg.slot + seg.length].set(si)
        return self.replace(slot_scale=slot_scale)


@flax.struct.dataclass
class KVCache:
    """The whole cache: one KindCache per kind of `layout.kinds` (layer l is `kinds[layout.kind_of[l]]`, at
    `layout.kind_index[l]`), each with its kind's own capacity (never padded to the largest)."""

    kinds: tuple[KindCache, ...]

    def layer(self, layout: CacheLayout, l: int) -> LayerCache:
        """Layer l's buffers."""
        return self.kinds[layout.kind_of[l]].layer(layout.kind_index[l])


def empty_v(dtype) -> float | int:
    """What an empty slot of V holds: -0.0 (int8: -128; int4 / int2's packed uint8: 255; both times the slot's zero
    scale and minimum), read as 0 like K's empty 0.

    Not 0 only because K and V would then be the same constant: XLA makes one buffer of the two and copies it to
    get the second, a copy of a whole stack. -128 is no value an int8 write stores (`quant` clips to ±127)."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        return -0.0
    info = jnp.iinfo(dtype)
    return int(info.min) if info.min < 0 else int(info.max)


def init_cache(
    layout: CacheLayout, rows: int, num_heads: int, head_dim: int, dtype=jnp.bfloat16, kv_dtype: str | None = None
) -> KVCache:
    """Empty buffers for `rows` sequences (2·batch under classifier-free guidance), one stack per layout kind.

    dtype: the model's compute dtype; kv_dtype: the storage dtype (`quant.KV_DTYPES`), None for `dtype`; a layer
    with its own (`LayerLayout.kv_dtype`, per-layer precision) keeps its own. The quantised ones add their float32
    scales (`quant.KVScales`; int4 / int2 also the minima) and int4 / int2 pack their codes into uint8
    [.., head_dim / P]."""
    lows = [plan.low.storage(kv_dtype) for plan in layout.layers if plan.low is not None]
    for storage in {kv_dtype, *layout.storages(kv_dtype), *lows}:
        quant.check_kv_dtype(storage, head_dim)

    def kind(n: int, plan: LayerLayout) -> KindCache:
        storage = plan.storage(kv_dtype)
        store = quant.storage_dtype(storage, dtype)
        width = head_dim // quant.chunks(storage)

        def buffer(fill) -> jax.Array:
            values = jnp.full((n, rows, plan.capacity, num_heads, width), fill, store)
            return jax.lax.bitcast_convert_type(values, bits_dtype(store))

        scales = None
        if quant.is_quantized(storage):
            asymmetric = storage in quant.ASYMMETRIC
            k = lambda: jnp.zeros((n, rows, plan.group_capacity, num_heads, head_dim), quant.SCALE_DTYPE)  # noqa: E731
            v = lambda: jnp.zeros((n, rows, plan.capacity, num_heads), quant.SCALE_DTYPE)  # noqa: E731
            scales = quant.KVScales(k=k(), v=v(), k_min=k() if asymmetric else None,
                                    v_min=v() if asymmetric else None, kv_dtype=storage)
        return KindCache(k=buffer(0), v=buffer(empty_v(store)), slot_scale=jnp.full((n, plan.capacity), -1, jnp.int32),
                         dtype=store, scales=scales, low=None if plan.low is None else kind(n, plan.low))

    return KVCache(kinds=tuple(kind(n, plan) for plan, n in zip(layout.kinds, layout.kind_sizes, strict=True)))


def layer_bytes(
    plan: LayerLayout, rows: int, num_heads: int, head_dim: int, dtype=jnp.bfloat16, kv_dtype: str | None = None
) -> int:
    """Exact bytes of one layer's buffers in `init_cache` with the same arguments (its slot_scale's few bytes
    included): K and V at `quant.value_bits` per element of the layer's storage (int4 / int2 packed), plus for
    quantised storage the float32 scales (K: per group and channel, V: per slot and head), twice for int4 / int2
    (scale and minimum); a low-precision tier's likewise."""
    low = 0 if plan.low is None else layer_bytes(plan.low, rows, num_heads, head_dim, dtype, kv_dtype)
    storage, slots = plan.storage(kv_dtype), plan.capacity
    total = 2 * rows * slots * num_heads * head_dim * quant.value_bits(storage, dtype) // 8 + 4 * slots
    if quant.is_quantized(storage):
        per_scale = jnp.dtype(quant.SCALE_DTYPE).itemsize * (2 if storage in quant.ASYMMETRIC else 1)
        total += per_scale * rows * num_heads * (plan.group_capacity * head_dim + slots)
    return total + low


def cache_bytes(
    layout: CacheLayout, rows: int, num_heads: int, head_dim: int, dtype=jnp.bfloat16, kv_dtype: str | None = None
) -> int:
    """Exact bytes of the buffers of `init_cache` with the same arguments: every layer's `layer_bytes`."""
    return sum(layer_bytes(plan, rows, num_heads, head_dim, dtype, kv_dtype) for plan in layout.layers)


def memory_share(layout: CacheLayout, num_heads: int, head_dim: int, kv_dtype: str | None = None) -> float:
    """The cache's bytes (`cache_bytes`, in `kv_dtype` and its layers' own storage, bfloat16 compute) against the
    full cache's in bfloat16: the share tables report (for unquantised layouts, the slot share)."""
    full = build_layout(lambda layer, si: tuple(range(si)), len(layout.layers), layout.patch_nums, policy="full")
    return (cache_bytes(layout, 1, num_heads, head_dim, jnp.bfloat16, kv_dtype)
            / cache_bytes(full, 1, num_heads, head_dim, jnp.bfloat16))
