"""The multi-scale VQ-VAE of VAR (reference `models/vqvae.py`, `quant.py`, `basic_vae.py`) in Flax Linen.

Activations are NHWC; images are in [−1, 1]. Shapes: B batch, H×W image, h×w = H/16 × W/16 latent grid (the last
patch number), C channels, Cv = Cvae latent channels, V codebook size, pn the side of a scale's token map.

- `encode`: image (B, H, W, 3) → f (B, h, w, Cv) = quant_conv(encoder(image)).
- Residual quantisation over the scales pn_0 < … < pn_{S−1} = h: at scale si the residual f_rest is
  area-resized to pn×pn, each cell takes its nearest code, and Φ_si(bicubic(codes → h×w)) is added to f_hat and
  taken off f_rest. At the last scale pn = h and both resizes are the identity, as in the reference. Tokens are
  int32 (B, pn²), row-major over the pn×pn grid.
- `decode`: f_hat → clip(decoder(post_quant_conv(f_hat)), −1, 1); `decode_in_chunks` runs it over at most
  `decode_chunk(config)` images at a time, so its temporaries do not grow with the batch (generation decodes so).

Module and parameter names follow the torch state dict (`convert/mapping.py`): `encoder/down_0/block_1/conv1`,
`decoder/up_3/attn_0/qkv`, `quantize/quant_resi/qresi_ls_2`, so a reference checkpoint maps with no renaming.
The scale loops are Python loops over the static config; every method jits. `init` goes through `__call__`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from amskv_jax.chunks import map_in_chunks
from amskv_jax.config import VQVAEConfig
from amskv_jax.resize import resize_area, resize_bicubic


def _group_norm(name: str) -> nn.GroupNorm:
    # torch GroupNorm(32, eps=1e-6) uses the two-pass variance; flax's default E[x²] − E[x]² is less exact.
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


def _conv(features: int, kernel: int = 3, name: str | None = None) -> nn.Conv:
    """A stride-1 'same' conv: torch Conv2d(kernel_size=k, padding=k // 2)."""
    return nn.Conv(features, (kernel, kernel), padding=kernel // 2, name=name)


class ResnetBlock(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), x through a 1×1 `nin_shortcut` when the width changes."""

    features: int

    @nn.compact
    def __call__(self, x_BHWC):
        h_BHWC = _conv(self.features, name="conv1")(nn.silu(_group_norm("norm1")(x_BHWC)))
        h_BHWC = _conv(self.features, name="conv2")(nn.silu(_group_norm("norm2")(h_BHWC)))
        if x_BHWC.shape[-1] != self.features:
            x_BHWC = _conv(self.features, 1, name="nin_shortcut")(x_BHWC)
        return x_BHWC + h_BHWC


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions (1×1 convs, scale C^−½, softmax in float32), residual."""

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        qkv_BL3C = _conv(3 * c, 1, name="qkv")(_group_norm("norm")(x_BHWC)).reshape(b, h * w, 3, c)
        q_BLC, k_BLC, v_BLC = qkv_BL3C[:, :, 0], qkv_BL3C[:, :, 1], qkv_BL3C[:, :, 2]
        scores_BLL = jnp.einsum("bqc,bkc->bqk", q_BLC, k_BLC) * c**-0.5
        attn_BLL = jax.nn.softmax(scores_BLL.astype(jnp.float32), axis=-1).astype(v_BLC.dtype)
        out_BHWC = jnp.einsum("bqk,bkc->bqc", attn_BLL, v_BLC).reshape(b, h, w, c)
        return x_BHWC + _conv(c, 1, name="proj_out")(out_BHWC)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3×3 stride-2 VALID conv: H → H/2."""

    @nn.compact
    def __call__(self, x_BHWC):
        x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x_BHWC.shape[-1], (3, 3), strides=2, padding="VALID", name="conv")(x_BHWC)


class Upsample(nn.Module):
    """Nearest ×2, then a 3×3 conv: H → 2H."""

    @nn.compact
    def __call__(self, x_BHWC):
        x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return _conv(x_BHWC.shape[-1], name="conv")(x_BHWC)


class Level(nn.Module):
    """One resolution (`encoder/down_i`, `decoder/up_i`): res blocks, each followed by attention when `attn`,
    then `resample` ("downsample", "upsample" or None)."""

    features: int
    num_blocks: int
    attn: bool
    resample: str | None

    @nn.compact
    def __call__(self, x_BHWC):
        for j in range(self.num_blocks):
            x_BHWC = ResnetBlock(self.features, name=f"block_{j}")(x_BHWC)
            if self.attn:
                x_BHWC = AttnBlock(name=f"attn_{j}")(x_BHWC)
        if self.resample == "downsample":
            x_BHWC = Downsample(name="downsample")(x_BHWC)
        elif self.resample == "upsample":
            x_BHWC = Upsample(name="upsample")(x_BHWC)
        return x_BHWC


class Mid(nn.Module):
    """The middle of encoder and decoder: `block_1`, `attn_1` (when `attn`), `block_2`."""

    features: int
    attn: bool

    @nn.compact
    def __call__(self, x_BHWC):
        x_BHWC = ResnetBlock(self.features, name="block_1")(x_BHWC)
        if self.attn:
            x_BHWC = AttnBlock(name="attn_1")(x_BHWC)
        return ResnetBlock(self.features, name="block_2")(x_BHWC)


def _out(features: int, x_BHWC):
    """`norm_out`, SiLU, `conv_out` (called inside a compact module, which owns the two layers)."""
    return _conv(features, name="conv_out")(nn.silu(_group_norm("norm_out")(x_BHWC)))


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) → (B, H/2^(levels−1), W/…, z_channels)."""

    config: VQVAEConfig

    @nn.compact
    def __call__(self, x_BHWC):
        c = self.config
        last = len(c.ch_mult) - 1
        x_BHWC = _conv(c.ch, name="conv_in")(x_BHWC)
        for i, mult in enumerate(c.ch_mult):
            x_BHWC = Level(
                c.ch * mult, c.num_res_blocks, attn=c.using_sa and i == last,
                resample=None if i == last else "downsample", name=f"down_{i}",
            )(x_BHWC)
        x_BHWC = Mid(c.ch * c.ch_mult[-1], c.using_mid_sa, name="mid")(x_BHWC)
        return _out(c.z_channels, x_BHWC)


class Decoder(nn.Module):
    """Latent (B, h, w, z_channels) → image (B, h·2^(levels−1), …, in_channels), not clipped."""

    config: VQVAEConfig

    @nn.compact
    def __call__(self, z_BhwC):
        c = self.config
        last = len(c.ch_mult) - 1
        x_BHWC = _conv(c.ch * c.ch_mult[-1], name="conv_in")(z_BhwC)
        x_BHWC = Mid(c.ch * c.ch_mult[-1], c.using_mid_sa, name="mid")(x_BHWC)
        for i in reversed(range(len(c.ch_mult))):
            x_BHWC = Level(
                c.ch * c.ch_mult[i], c.num_res_blocks + 1, attn=c.using_sa and i == last,
                resample=None if i == 0 else "upsample", name=f"up_{i}",
            )(x_BHWC)
        return _out(c.in_channels, x_BHWC)


def phi_index(si: int, num_scales: int, num_convs: int) -> int:
    """Which of the `num_convs` shared Φ convs scale `si` uses: the tick nearest to si/(S−1) (reference
    `PhiPartiallyShared`; ties go to the lower index, as np.argmin)."""
    k = num_convs
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


class QuantResi(nn.Module):
    """Φ_si(h) = (1 − r)·h + r·conv3x3(h), r = |quant_resi|, with `share_quant_resi` = K convs shared by the scales.

    K > 1: convs `qresi_ls_{k}` (reference `PhiPartiallyShared`). K = 1: one conv named `qresi`, the reference's
    `PhiShared` key, so such checkpoints map too. r ≈ 0: Φ is the identity and has no parameters, as in the
    reference. (The reference's non-shared variant, share_quant_resi=0, is not supported by VQVAEConfig.)
    """

    config: VQVAEConfig

    def setup(self):
        c = self.config
        if abs(c.quant_resi) <= 1e-6:
            return
        if c.share_quant_resi == 1:
            self.qresi = _conv(c.z_channels)
        else:
            self.qresi_ls = [_conv(c.z_channels) for _ in range(c.share_quant_resi)]

    def _convs(self) -> tuple[nn.Conv, ...]:
        c = self.config
        if abs(c.quant_resi) <= 1e-6:
            return ()
        return (self.qresi,) if c.share_quant_resi == 1 else tuple(self.qresi_ls)

    def __call__(self, si: int, h_BhwC):
        convs = self._convs()
        if not convs:
            return h_BhwC
        if self.is_initializing():  # create every conv, also those no scale of a short ladder selects
            for conv in convs:
                conv(h_BhwC)
        r = abs(self.config.quant_resi)
        conv = convs[phi_index(si, len(self.config.patch_nums), len(convs))]
        return (1 - r) * h_BhwC + r * conv(h_BhwC)


class Quantizer(nn.Module):
    """`quantize`: the codebook (`embedding`, (V, Cv)) and the Φ convs (`quant_resi`)."""

    config: VQVAEConfig

    def setup(self):
        self.embedding = nn.Embed(self.config.vocab_size, self.config.z_channels)
        self.quant_resi = QuantResi(self.config)

    def lookup(self, idx_Bl):
        """Tokens (B, pn²) → code map (B, pn, pn, Cv) in float32, the dtype f_hat accumulates in."""
        b, l = idx_Bl.shape
        pn = round(l**0.5)
        return self.embedding(idx_Bl).astype(jnp.float32).reshape(b, pn, pn, self.config.z_channels)

    def nearest(self, z_BpnpnC):
        """Index of the nearest code for every cell, (B, pn²) int32. Squared distances as the reference computes
        them, ‖z‖² + ‖e‖² − 2·z·e, in float32."""
        b, _, _, cv = z_BpnpnC.shape
        z_NC = z_BpnpnC.reshape(-1, cv).astype(jnp.float32)
        e_VC = self.embedding.embedding.astype(jnp.float32)
        dot_NV = jnp.einsum("nc,vc->nv", z_NC, e_VC, precision=jax.lax.Precision.HIGHEST)
        d_NV = jnp.sum(z_NC**2, axis=1, keepdims=True) + jnp.sum(e_VC**2, axis=1) - 2 * dot_NV
        return jnp.argmin(d_NV, axis=1).astype(jnp.int32).reshape(b, -1)


class VQVAE(nn.Module):
    """The VQ-VAE (reference `VQVAE`). Use through `model.apply(variables, ..., method=VQVAE.<name>)`."""

    config: VQVAEConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = _conv(c.z_channels)
        self.post_quant_conv = _conv(c.z_channels)
        self.quantize = Quantizer(c)

    def __call__(self, img_BHWC):
        """The training forward (reference `VQVAE.forward` / `VectorQuantizer2.forward`).

        Returns (rec_BHWC, vq_loss, idx list): the reconstruction, not clipped, of the straight-through f_hat
        (value f_hat, gradient to f); vq_loss = mean over scales of β·mse(sg(f_hat_si), f) + mse(f_hat_si, sg(f)),
        which trains the encoder (commitment) and the codebook and Φ convs; the tokens, for codebook statistics.
        """
        f_BhwC = self.encode(img_BHWC).astype(jnp.float32)
        idx, f_hats = self.quantize_f(f_BhwC)
        f_sg = jax.lax.stop_gradient(f_BhwC)
        losses = [
            self.config.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f_BhwC) ** 2) + jnp.mean((f_hat - f_sg) ** 2)
            for f_hat in f_hats
        ]
        f_hat_st = jax.lax.stop_gradient(f_hats[-1]) - f_sg + f_BhwC
        rec_BHWC = self.decoder(self.post_quant_conv(f_hat_st))
        return rec_BHWC, sum(losses) / len(losses), idx

    def encode(self, img_BHWC):
        """Image (B, H, W, 3) → f (B, h, w, Cv)."""
        return self.quant_conv(self.encoder(img_BHWC))

    def decode(self, f_hat_BhwC):
        """f_hat (B, h, w, Cv) → image (B, H, W, 3) clipped to [−1, 1]."""
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat_BhwC)), -1, 1)

    def phi(self, si: int, h_BhwC):
        """Φ of scale `si` (see QuantResi)."""
        return self.quantize.quant_resi(si, h_BhwC)

    def quantize_f(self, f_BhwC):
        """Residual quantisation of f (B, h, w, Cv) → (idx list of (B, pn²) int32, f_hat list of (B, h, w, Cv)
        float32, f_hat after each scale). No gradient reaches f; f_hat carries the codebook's and Φ's."""
        h_side = f_BhwC.shape[1:3]
        f_rest_BhwC = jax.lax.stop_gradient(f_BhwC).astype(jnp.float32)
        f_hat_BhwC = jnp.zeros_like(f_rest_BhwC)
        idx, f_hats = [], []
        for si, pn in enumerate(self.config.patch_nums):
            idx_Bl = self.quantize.nearest(resize_area(f_rest_BhwC, pn))
            h_BhwC = self.phi(si, resize_bicubic(self.quantize.lookup(idx_Bl), h_side))
            f_hat_BhwC = f_hat_BhwC + h_BhwC
            f_rest_BhwC = f_rest_BhwC - h_BhwC
            idx.append(idx_Bl)
            f_hats.append(f_hat_BhwC)
        return idx, f_hats

    def img_to_idx(self, img_BHWC):
        """Image (B, H, W, 3) → tokens, one (B, pn²) int32 per scale (reference `img_to_idxBl`)."""
        return self.quantize_f(self.encode(img_BHWC))[0]

    def next_input(self, si: int, f_hat_BhwC, h_BpnpnC):
        """One generation step (reference `get_next_autoregressive_input`): f_hat += Φ_si(bicubic(h → h×w)).

        Returns (f_hat, next_BlCv): the next scale's input, f_hat area-resized to pn_{si+1} and flattened
        row-major to (B, pn_{si+1}², Cv); None after the last scale.
        """
        patch_nums = self.config.patch_nums
        h_side = f_hat_BhwC.shape[1:3]
        f_hat_BhwC = f_hat_BhwC + self.phi(si, resize_bicubic(h_BpnpnC, h_side))
        if si == len(patch_nums) - 1:
            return f_hat_BhwC, None
        pn = patch_nums[si + 1]
        return f_hat_BhwC, resize_area(f_hat_BhwC, pn).reshape(f_hat_BhwC.shape[0], pn * pn, -1)

    def _zeros_fhat(self, idx):
        side = self.config.patch_nums[-1]
        return jnp.zeros((idx[0].shape[0], side, side, self.config.z_channels), jnp.float32)

    def idx_to_fhat(self, idx):
        """Tokens of all S scales → the final f_hat (B, h, w, Cv) float32 (reference `embed_to_fhat`,
        all_to_max_scale=True, last_one=True)."""
        f_hat_BhwC = self._zeros_fhat(idx)
        for si, idx_Bl in enumerate(idx):
            f_hat_BhwC, _ = self.next_input(si, f_hat_BhwC, self.quantize.lookup(idx_Bl))
        return f_hat_BhwC

    def idx_to_img(self, idx):
        """Tokens of all S scales → image (B, H, W, 3) in [−1, 1] (reference `idxBl_to_img(last_one=True)`)."""
        return self.decode(self.idx_to_fhat(idx))

    def idx_to_var_input(self, idx):
        """Teacher-forcing input (B, L − first_l, Cv) float32 from ground-truth tokens (reference
        `idxBl_to_var_input`): the inputs of scales 1 .. S−1, concatenated; the last scale's tokens are unused."""
        f_hat_BhwC = self._zeros_fhat(idx)
        inputs = []
        for si in range(len(self.config.patch_nums) - 1):
            f_hat_BhwC, next_BlCv = self.next_input(si, f_hat_BhwC, self.quantize.lookup(idx[si]))
            inputs.append(next_BlCv)
        return jnp.concatenate(inputs, axis=1)


# What one chunk of the decode may spend on one full-resolution float32 activation (H·W·ch): the decoder's
# temporaries are a few such activations, so about 1 GiB of them at 256 px (3 images), while small models decode
# their usual batches in one piece.
DECODE_BUDGET_BYTES = 2**27


def decode_chunk(config: VQVAEConfig) -> int:
    """Images the decode runs at once: as many as keep one full-resolution float32 activation of the decoder
    (image_size² · ch channels) within DECODE_BUDGET_BYTES, at least 1."""
    return max(1, DECODE_BUDGET_BYTES // (config.image_size**2 * config.ch * 4))


def decode_in_chunks(vqvae: VQVAE, variables, f_hat_BhwC, chunk: int):
    """`VQVAE.decode` of f_hat (B, h, w, Cv) over at most `chunk` images at a time (`chunks.map_in_chunks`: the
    last chunk padded, strided so that a batch split over devices decodes its own images): images (B, H, W, 3),
    equal to decoding all at once."""
    return map_in_chunks(functools.partial(vqvae.apply, variables, method=VQVAE.decode), chunk, f_hat_BhwC)
