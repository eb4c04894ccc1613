"""Per-image work in bounded chunks (`amskv_jax.chunks`): the VQ-VAE decode's images equal the one-piece decode's,
generation decodes and samples so with the same tokens, and the chunk sizes bound what one chunk builds.

Not bit for bit: XLA's CPU decoder rounds differently at different batch sizes (the same 4 images decoded as one
batch and as two batches of 2 differ by 1e-5), so a chunked decode matches to ATOL on values in [-1, 1], and exactly
where the chunk holds the whole batch. A wrong chunk order or padding differs by ~1."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax import generate as generate_module
from amskv_jax.checkpoint import init_params
from amskv_jax.config import get_preset
from amskv_jax.generate import generate
from amskv_jax.chunks import CHUNK_BYTES, block_row_chunk, sampler_chunk
from amskv_jax.vqvae import VQVAE, decode_chunk, decode_in_chunks

TINY = get_preset("tiny")


ATOL = 5e-5


@pytest.mark.parametrize("batch, chunk", [(5, 2), (6, 3), (3, 8)])
def test_chunked_decode_equals_the_one_piece_decode(batch, chunk):
    """Batches divisible by the chunk and not (the last chunk padded), and a batch within one chunk (exact)."""
    vqvae = VQVAE(TINY.vqvae)
    variables = init_params(TINY)["vqvae"]
    side = TINY.vqvae.patch_nums[-1]
    shape = (batch, side, side, TINY.vqvae.z_channels)
    f_hat = jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))
    whole = jax.jit(lambda v, f: vqvae.apply(v, f, method=VQVAE.decode))(variables, f_hat)
    chunked = jax.jit(lambda v, f: decode_in_chunks(vqvae, v, f, chunk))(variables, f_hat)
    assert chunked.shape == whole.shape == (batch, TINY.vqvae.image_size, TINY.vqvae.image_size, 3)
    if batch <= chunk:
        np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=0, atol=ATOL)


def test_chunk_bounds_a_256px_decode_and_leaves_small_models_whole():
    assert decode_chunk(get_preset("d30").vqvae) == 3
    assert decode_chunk(TINY.vqvae) >= 256  # 64 px, 32 channels: the tests' batches decode in one piece


# the tokens of two programs, rounded as users' programs round (conftest's fast codegen flips near-ties)
@pytest.mark.usefixtures("users_codegen")
def test_generate_decodes_and_samples_in_chunks_of_images_with_the_same_tokens(monkeypatch):
    """The VQ-VAE decode and the head and sampler over 2 images at a time on 5 (3 chunks, the last padded), Gumbel
    smoothing on: every image draws from its own keys, so tokens equal the one-piece program's; logits agree to float
    rounding (guidance amplifies the head's), images to that rounding amplified by the smoothing's softmax (its
    temperature is 0.0135 at the last scale: 10·ATOL; 1e-4 measured) and the decoder's at another batch size. A
    wrong chunk order, padding or key per image would differ by ~1."""
    params = init_params(TINY)
    labels = jnp.arange(5) % TINY.var.num_classes
    run = lambda: generate(params, labels, jax.random.key(4), config=TINY, top_k=8, more_smooth=True,  # noqa: E731
                           return_logits=True)
    whole = run()
    decode_chunks, sampler_scales = [], []
    monkeypatch.setattr(generate_module, "decode_chunk", lambda config: 2)
    monkeypatch.setattr(generate_module, "decode_in_chunks",
                        lambda *args: decode_chunks.append(args[-1]) or decode_in_chunks(*args))
    monkeypatch.setattr(generate_module, "sampler_chunk", lambda config, si: sampler_scales.append(si) or 2)
    jax.clear_caches()  # the chunks are read while tracing
    chunked = run()
    assert decode_chunks == [2] and sampler_scales == list(range(TINY.var.num_scales))
    for a, b in zip(chunked.tokens, whole.tokens, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(chunked.logits, whole.logits, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(np.asarray(chunked.images), np.asarray(whole.images), rtol=0, atol=10 * ATOL)
    np.testing.assert_array_equal(np.asarray(chunked.finite), np.asarray(whole.finite))


def test_chunk_sizes_bound_one_chunks_buffers_at_d30():
    """d30, batch 128 (256 rows): the last scale's blocks take 4 rows at a time (their float32 scores 4 · 30 · 256 ·
    680 · 4 bytes ≤ CHUNK_BYTES; the next divisor, 8, would not fit), the first scale every row; the sampler 16
    images of the 16×16 scale."""
    c = get_preset("d30").var
    last = c.num_scales - 1
    assert block_row_chunk(c, 256, last) == 4 and block_row_chunk(c, 256, 0) == 256
    assert 8 * c.num_heads * 256 * c.seq_len * 4 > CHUNK_BYTES >= 4 * c.num_heads * 256 * c.seq_len * 4
    assert block_row_chunk(c, 254, last) == 2  # 254 = 2 · 127: the largest divisor that fits
    assert sampler_chunk(c, last) == 16 and 2 * 16 * 256 * c.vocab_size * 4 == CHUNK_BYTES
    assert sampler_chunk(c, 0) == CHUNK_BYTES // (2 * c.vocab_size * 4)
