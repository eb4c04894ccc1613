"""The VQ-VAE against the reference fixture (tokens, f_hat, reconstructions, teacher-forcing input), the Φ conv
choice and naming, and the training forward (loss and straight-through gradients).

The fixture's weights are stored in float16 (`vae_f16.safetensors`) and run here in float32, while the reference
outputs came from the float32 weights. Rounding every weight to float16 (relative error ≤ 2^−11 ≈ 4.9e−4) is then
the dominant error, and the tolerances below are set from what it produces (measured, max abs):
tokens: all 60 agree (the closest runner-up code is 0.6 % farther than the chosen one);
f_hat and teacher-forcing input (codebook and one Φ conv): 1.1e−4 and 1.4e−4, on values up to 0.4;
images (some 30 convs deep in the decoder): 8.6e−3, on values in [−1, 1].
With the float32 weights the same comparisons agree to 1.5e−7 (f_hat, teacher-forcing input) and 1.2e−5 (images).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax.config import VQVAEConfig, get_preset
from amskv_jax.vqvae import VQVAE, phi_index
from convert.mapping import state_dict_to_params
from convert.torch_pickle import load_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "tiny"
LATENT_ATOL = 5e-4  # f_hat, teacher-forcing input
IMAGE_ATOL = 3e-2  # decoded images


def _nhwc(x_NCHW):
    return jnp.asarray(np.transpose(x_NCHW, (0, 2, 3, 1)))


def _target(model: VQVAE):
    side = model.config.image_size
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 3))))["params"]


@pytest.fixture(scope="module")
def ref():
    """(model, float32 variables from the float16 checkpoint, io.npz, reference tokens per scale)."""
    model = VQVAE(get_preset("tiny").vqvae)
    path = FIXTURES / "vae_f16.safetensors"
    params = state_dict_to_params(load_state_dict(path), _target(model), source=str(path))
    variables = {"params": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)}
    io = np.load(FIXTURES / "io.npz")
    idx = [jnp.asarray(io[f"vae_idx_s{si}"], jnp.int32) for si in range(len(model.config.patch_nums))]
    return model, variables, io, idx


def _apply(model, variables, method, *args):
    return jax.jit(lambda v, *a: model.apply(v, *a, method=method))(variables, *args)


def test_img_to_idx_reproduces_reference_tokens(ref):
    model, variables, io, ref_idx = ref
    idx = _apply(model, variables, VQVAE.img_to_idx, _nhwc(io["vae_img_in"]))
    for si, (ours, theirs) in enumerate(zip(idx, ref_idx)):
        assert ours.dtype == jnp.int32 and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs, err_msg=f"scale {si}")


def test_quantize_f_last_fhat_matches_reference(ref):
    model, variables, io, _ = ref
    quantize = lambda m, img: m.quantize_f(m.encode(img))[1][-1]  # noqa: E731
    f_hat = _apply(model, variables, quantize, _nhwc(io["vae_img_in"]))
    np.testing.assert_allclose(f_hat, _nhwc(io["vae_fhat"]), rtol=0, atol=LATENT_ATOL)


def test_idx_to_fhat_matches_reference(ref):
    model, variables, io, idx = ref
    f_hat = _apply(model, variables, VQVAE.idx_to_fhat, idx)
    np.testing.assert_allclose(f_hat, _nhwc(io["vae_fhat"]), rtol=0, atol=LATENT_ATOL)


def test_decode_matches_reference_reconstruction(ref):
    model, variables, io, _ = ref
    rec = _apply(model, variables, VQVAE.decode, _nhwc(io["vae_fhat"]))
    assert float(jnp.abs(rec).max()) <= 1.0
    np.testing.assert_allclose(rec, _nhwc(io["vae_rec"]), rtol=0, atol=IMAGE_ATOL)


def test_idx_to_img_matches_reference(ref):
    model, variables, io, idx = ref
    img = _apply(model, variables, VQVAE.idx_to_img, idx)
    np.testing.assert_allclose(img, _nhwc(io["vae_idx_to_img"]), rtol=0, atol=IMAGE_ATOL)


def test_idx_to_var_input_matches_reference_teacher_forcing_input(ref):
    model, variables, io, _ = ref
    tf_idx = [jnp.asarray(io[f"tf_idx_s{si}"], jnp.int32) for si in range(len(model.config.patch_nums))]
    x_BLCv = _apply(model, variables, VQVAE.idx_to_var_input, tf_idx)
    np.testing.assert_allclose(x_BLCv, io["tf_x_BLCv"], rtol=0, atol=LATENT_ATOL)


def test_next_input_at_the_last_scale_returns_no_input(ref):
    model, variables, _, idx = ref
    side = model.config.patch_nums[-1]
    shape = (2, side, side, model.config.z_channels)
    h_BpnpnC = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
    f_hat, nxt = model.apply(variables, len(idx) - 1, jnp.zeros_like(h_BpnpnC), h_BpnpnC, method=VQVAE.next_input)
    assert nxt is None
    np.testing.assert_allclose(f_hat, model.apply(variables, len(idx) - 1, h_BpnpnC, method=VQVAE.phi), atol=1e-6)


@pytest.mark.parametrize("num_scales, num_convs, expected", [
    # ticks 1/12, 13/36, 23/36, 11/12 against si/9; si = 2 (8/36) is exactly between the first two and float64
    # rounding picks 1, as it does in the reference's identical numpy expression.
    (10, 4, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),
    (4, 4, [0, 1, 2, 3]),
    (4, 2, [0, 0, 1, 1]),  # ticks 1/4, 3/4
    (3, 4, [0, 2, 3]),  # 1/2 = 18/36 is a tie again, rounded towards 23/36
])
def test_phi_index_follows_reference_ticks(num_scales, num_convs, expected):
    assert [phi_index(si, num_scales, num_convs) for si in range(num_scales)] == expected


MICRO = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4))


@pytest.mark.parametrize("share, quant_resi, names", [
    (4, 0.5, ["qresi_ls_0", "qresi_ls_1", "qresi_ls_2", "qresi_ls_3"]),  # qresi_ls_1 is used by no scale of (1,2,4)
    (1, 0.5, ["qresi"]),
    (4, 0.0, []),
])
def test_init_creates_every_phi_conv_under_its_torch_name(share, quant_resi, names):
    config = dataclasses.replace(MICRO, share_quant_resi=share, quant_resi=quant_resi)
    quantize = _target(VQVAE(config))["quantize"]
    assert sorted(quantize.get("quant_resi", {})) == names
    assert quantize["embedding"]["embedding"].shape == (16, 4)


def test_training_forward_loss_and_straight_through_gradients():
    model = VQVAE(MICRO)
    img_BHWC = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32))
    # Random weights straight from numpy: compiling `init` (its random initialisers) takes ~10 s on CPU.
    rng = np.random.default_rng(0)
    variables = {"params": jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32), _target(model))}

    def forward_and_parts(m, img):
        idx, f_hats = m.quantize_f(m.encode(img))
        return m(img), idx, f_hats, m.encode(img), m.decode(f_hats[-1])

    (rec, vq_loss, idx), ref_idx, f_hats, f_BhwC, decoded = _apply(model, variables, forward_and_parts, img_BHWC)
    expected = np.mean([(1 + MICRO.beta) * jnp.mean((f_hat - f_BhwC) ** 2) for f_hat in f_hats])
    np.testing.assert_allclose(vq_loss, expected, rtol=1e-5)
    assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 16)]
    np.testing.assert_array_equal(jnp.concatenate(idx, 1), jnp.concatenate(ref_idx, 1))
    np.testing.assert_allclose(jnp.clip(rec, -1, 1), decoded, atol=1e-5)

    def outputs(v):
        rec, vq_loss, _ = model.apply(v, img_BHWC)
        return jnp.stack([jnp.sum(rec), vq_loss])

    jac = jax.jit(jax.jacrev(outputs))(variables)["params"]  # leaves (2, *shape): d sum(rec), d vq_loss
    rec_grads, loss_grads = ({name: float(sum(jnp.abs(g[k]).sum() for g in jax.tree.leaves(jac[name])))
                              for name in jac} for k in (0, 1))
    # The reconstruction reaches the encoder through the straight-through estimator, not the codebook or Φ.
    assert rec_grads["encoder"] > 0 and rec_grads["decoder"] > 0 and rec_grads["quantize"] == 0
    # The vq loss trains the codebook and Φ, and the encoder through the commitment term; not the decoder.
    assert loss_grads["quantize"] > 0 and loss_grads["encoder"] > 0 and loss_grads["decoder"] == 0
