"""Frozen, hashable model configurations and the published presets.

Everything that changes an array shape lives here as static data, so a config can be a `jax.jit` static
argument and a dictionary key. Validation happens in `__post_init__`: a bad config fails at construction, before
anything is traced, with a message naming the offending value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from amskv_jax.errors import UserError

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """The multi-scale VQ-VAE (reference `models/vqvae.py`).

    `patch_nums` is the token ladder; its last entry is the latent grid, so the image side is
    `patch_nums[-1] * 2**(len(ch_mult) - 1)`.
    """

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    beta: float = 0.25  # commitment loss weight (training only)
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    in_channels: int = 3

    def __post_init__(self):
        _check(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _check(self.ch % 32 == 0, f"ch must be a multiple of 32 (GroupNorm has 32 groups), got {self.ch}")
        _check(len(self.ch_mult) >= 1, "ch_mult must not be empty")
        _check(self.share_quant_resi >= 1, f"share_quant_resi must be >= 1, got {self.share_quant_resi}")
        _check(
            len(self.patch_nums) >= 2 and list(self.patch_nums) == sorted(set(self.patch_nums)),
            f"patch_nums must be at least two strictly increasing sizes, got {self.patch_nums}",
        )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """The VAR transformer (reference `models/var.py`). Shapes: C = embed_dim, H = num_heads, L = sum(pn²)."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    vocab_size: int = 4096
    cvae: int = 32
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1

    def __post_init__(self):
        _check(self.depth >= 1, f"depth must be >= 1, got {self.depth}")
        _check(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        _check(
            self.embed_dim % self.num_heads == 0,
            f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
            f"allowed head counts: {[h for h in range(1, self.embed_dim + 1) if self.embed_dim % h == 0][:12]}...",
        )
        _check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        _check(
            len(self.patch_nums) >= 2 and list(self.patch_nums) == sorted(set(self.patch_nums)),
            f"patch_nums must be at least two strictly increasing sizes, got {self.patch_nums}",
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def seq_len(self) -> int:
        """L: tokens over all scales."""
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        """(begin, end) token slice of every scale."""
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return tuple(out)

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A VAR transformer with the VQ-VAE it was trained on."""

    var: VARConfig
    vqvae: VQVAEConfig

    def __post_init__(self):
        _check(
            self.var.patch_nums == self.vqvae.patch_nums,
            f"VAR patch_nums {self.var.patch_nums} differ from the VQ-VAE's {self.vqvae.patch_nums}",
        )
        _check(
            (self.var.vocab_size, self.var.cvae) == (self.vqvae.vocab_size, self.vqvae.z_channels),
            f"VAR vocab/Cvae {(self.var.vocab_size, self.var.cvae)} differ from the VQ-VAE's "
            f"{(self.vqvae.vocab_size, self.vqvae.z_channels)}",
        )

    def to_json(self) -> str:
        return json.dumps({"var": dataclasses.asdict(self.var), "vqvae": dataclasses.asdict(self.vqvae)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data = json.loads(text)
        return cls(var=_from_dict(VARConfig, data["var"]), vqvae=_from_dict(VQVAEConfig, data["vqvae"]))


def _from_dict(kind: type, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    _check(not unknown, f"unknown {kind.__name__} fields {unknown}; allowed: {sorted(names)}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _published(depth: int, patch_nums: tuple[int, ...], shared_aln: bool = False) -> ModelConfig:
    var = VARConfig(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums, shared_aln=shared_aln)
    return ModelConfig(var=var, vqvae=VQVAEConfig(patch_nums=patch_nums))


def _tiny(patch_nums: tuple[int, ...], shared_aln: bool = False) -> ModelConfig:
    """The reference fixtures' configuration (`tests/fixtures/*/config.json`)."""
    var = VARConfig(
        depth=2, embed_dim=128, num_heads=2, num_classes=10, patch_nums=patch_nums, vocab_size=512, cvae=8,
        shared_aln=shared_aln, cond_drop_rate=0.0,
    )
    return ModelConfig(var=var, vqvae=VQVAEConfig(vocab_size=512, z_channels=8, ch=32, patch_nums=patch_nums))


PRESETS: dict[str, ModelConfig] = {
    "d16": _published(16, PATCH_NUMS_256),
    "d20": _published(20, PATCH_NUMS_256),
    "d24": _published(24, PATCH_NUMS_256),
    "d30": _published(30, PATCH_NUMS_256),
    "d36": _published(36, PATCH_NUMS_512, shared_aln=True),
    "tiny": _tiny((1, 2, 3, 4)),
    "tiny-saln": _tiny((1, 2, 3, 4), shared_aln=True),
    "tiny-ladder256": _tiny(PATCH_NUMS_256),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; unknown names fail with the list of known ones."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
