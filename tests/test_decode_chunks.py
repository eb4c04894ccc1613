"""The VQ-VAE decode in bounded chunks: images equal the one-piece decode, and generation decodes so.

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
from amskv_jax.vqvae import VQVAE, decode_chunk, decode_in_chunks

TINY = get_preset("tiny")


ATOL = 5e-5


@pytest.mark.parametrize("batch, chunk", [(5, 2), (6, 3), (3, 8)])
def test_chunked_decode_equals_the_one_piece_decode(batch, chunk):
    """Batches divisible by the chunk and not (the last chunk padded), and a batch within one chunk (exact)."""
    vqvae = VQVAE(TINY.vqvae)
    variables = init_params(TINY)["vqvae"]
    side = TINY.vqvae.patch_nums[-1]
    f_hat = jax.random.normal(jax.random.key(1), (batch, side, side, TINY.vqvae.z_channels), jnp.float32)
    whole = jax.jit(lambda v, f: vqvae.apply(v, f, method=VQVAE.decode))(variables, f_hat)
    chunked = jax.jit(lambda v, f: decode_in_chunks(vqvae, v, f, chunk))(variables, f_hat)
    assert chunked.shape == whole.shape == (batch, TINY.vqvae.image_size, TINY.vqvae.image_size, 3)
    if batch <= chunk:
        np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=0, atol=ATOL)


def test_chunk_bounds_a_256px_decode_and_leaves_small_models_whole():
    assert decode_chunk(get_preset("d30").vqvae) == 3
    assert decode_chunk(TINY.vqvae) >= 256  # 64 px, 32 channels: the tests' batches decode in one piece


def test_generate_decodes_in_chunks_with_the_same_images(monkeypatch):
    """generate with a 2-image chunk on 5 images (3 chunks, the last padded) gives the one-piece images."""
    params = init_params(TINY)
    labels = jnp.arange(5) % TINY.var.num_classes
    run = lambda: generate(params, labels, jax.random.key(0), config=TINY, top_k=0)  # noqa: E731
    whole = run()
    chunks = []
    monkeypatch.setattr(generate_module, "decode_chunk", lambda config: 2)
    monkeypatch.setattr(generate_module, "decode_in_chunks",
                        lambda *args: chunks.append(args[-1]) or decode_in_chunks(*args))
    jax.clear_caches()  # the chunk is read while tracing
    chunked = run()
    assert chunks == [2]
    np.testing.assert_allclose(np.asarray(chunked.images), np.asarray(whole.images), rtol=0, atol=ATOL)
    for a, b in zip(chunked.tokens, whole.tokens, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
