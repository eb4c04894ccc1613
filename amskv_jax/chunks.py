"""Per-image work in bounded chunks, so that a program's temporaries stop growing with the batch.

Rows are independent in every op of a generation step, so a scale's work can run over a static number of rows at a
time while the whole cache stays resident. Two kinds of chunking, each sized so that its largest buffer stays
within `CHUNK_BYTES`:

* a scale over chunks of images (`image_chunk`, `generate`): a `lax.scan` over contiguous chunks of images, each
  chunk's token inputs, blocks, head and draw together, reading and writing its rows of the cache, so that the
  activations between those steps are one chunk's, not the batch's;
* the blocks (`VAR.step_rows(row_chunk=...)`): within an image chunk, a `lax.scan` over contiguous chunks of rows;
  the chunk must divide the rows (`block_row_chunk`);
* the head and the sampler, and the VQ-VAE decode (`map_in_chunks`): a `lax.map` over strided chunks of images,
  the batch padded to whole chunks; no cache is involved, so any chunk works (`sampler_chunk`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from amskv_jax.config import VARConfig

# The largest buffer one chunk may build: a float32 score matrix of the blocks, or the sampler's float32 logits.
CHUNK_BYTES = 2**27


def block_row_chunk(config: VARConfig, rows: int, si: int) -> int:
    """Rows of scale `si`'s blocks at a time: the largest divisor of `rows` whose float32 attention scores
    (rows · heads · pn² · L) fit in CHUNK_BYTES, at least 1. Early scales run every row at once."""
    pn = config.patch_nums[si]
    per_row = config.num_heads * pn * pn * config.seq_len * 4
    fits = max(1, CHUNK_BYTES // per_row)
    return max(d for d in range(1, min(rows, fits) + 1) if rows % d == 0)


def image_chunk(config: VARConfig, batch: int, si: int, row_chunk: int | None = None) -> tuple[int, int]:
    """(images, rows): scale si runs over chunks of `images` images (a divisor of batch, both guidance rows of
    each), the blocks within a chunk over `rows` rows at a time (a divisor of 2·images): the chunk holds
    `row_chunk` rows (None: `block_row_chunk`), rounded down to whole images (at least one)."""
    rows = block_row_chunk(config, 2 * batch, si) if row_chunk is None else row_chunk
    fits = max(1, rows // 2)
    images = max(d for d in range(1, min(batch, fits) + 1) if batch % d == 0)
    return images, math.gcd(rows, 2 * images)


def sampler_chunk(config: VARConfig, si: int) -> int:
    """Images the head and the sampler take at a time at scale `si`: as many as keep their float32 logits (2 rows
    an image under guidance · pn² · V) within CHUNK_BYTES, at least 1."""
    pn = config.patch_nums[si]
    return max(1, CHUNK_BYTES // (2 * pn * pn * config.vocab_size * 4))


def map_in_chunks(fn, chunk: int, *arrays):
    """fn(*arrays) with every array's leading axis B cut into at most `chunk` rows at a time: a `lax.map` over
    ⌈B/chunk⌉ chunks, the arrays padded to whole chunks with copies of their last row (any dtype, PRNG keys too; the
    padding's results are dropped). fn must treat rows independently; its results (a pytree) have the leading axis
    B too. B ≤ chunk is one plain call.

    Chunk j holds rows j, n + j, 2n + j, … (n chunks): with the batch split over devices in contiguous blocks and
    `chunk` a multiple of their number, every device works on chunk/devices of its own rows in each step."""
    b = arrays[0].shape[0]
    if b <= chunk:
        return fn(*arrays)
    n = -(-b // chunk)

    def split(a):
        padded = jnp.pad(a, ((0, n * chunk - b),) + ((0, 0),) * (a.ndim - 1), mode="edge")
        return padded.reshape(chunk, n, *a.shape[1:]).swapaxes(0, 1)

    def join(a):
        return a.swapaxes(0, 1).reshape(n * chunk, *a.shape[2:])[:b]

    return jax.tree.map(join, jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays)))
