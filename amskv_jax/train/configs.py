"""Named training configurations: the model to train, the data it sees, and each stage's optimiser schedule.

A `TrainConfig` is frozen data like the model configs it wraps; the command line (`python -m amskv_jax.train`)
picks one by name and may override a stage's steps, batch size, learning rate and seed.
"""
from __future__ import annotations

import dataclasses

from amskv_jax.config import ModelConfig, VARConfig, VQVAEConfig, _check
from amskv_jax.errors import UserError
from amskv_jax.train.data import SCHEMES, SPLITS, class_names


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `end_lr_ratio·lr`, global-norm clipping.

    Weight decay skips biases, norms, embeddings and position/level tables (the reference's `nowd_keys`).
    """

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 2.0
    end_lr_ratio: float = 0.01
    save_every: int = 250
    seed: int = 0

    def __post_init__(self):
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(0 <= self.warmup_steps, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}")


# The sample classifier (amskv_jax.classifier), trained on the scheme's train split of either config.
CLASSIFIER_OPTIM = OptimConfig(steps=1500, batch_size=64, lr=2e-3, warmup_steps=100, save_every=500)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The model, the emoji data, and the optimisers of both stages and of the sample classifier.

    The data is the `scheme`'s emoji (`amskv_jax.train.data.SCHEMES`), of the `split` both stages train on ("all", or
    "train" to keep the held-out split unseen); `max_per_group` caps each class (None = all). `flip`: the VAR also
    trains on every image's left-right mirror image (tokenised by the same VQ-VAE, which trains on the originals).
    The VQ-VAE reconstruction loss is `l1·|x − x̂| + l2·(x − x̂)²` plus the quantiser's vq loss.
    """

    model: ModelConfig
    vqvae_optim: OptimConfig
    var_optim: OptimConfig
    classifier_optim: OptimConfig = CLASSIFIER_OPTIM
    scheme: str = "ranges"
    split: str = "all"
    max_per_group: int | None = None
    rec_l1: float = 1.0
    rec_l2: float = 1.0
    flip: bool = False

    def __post_init__(self):
        _check(self.scheme in SCHEMES, f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        _check(self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}")

    @property
    def image_size(self) -> int:
        return self.model.vqvae.image_size


def _model(
    *, image_ladder: tuple[int, ...], num_classes: int, vocab: int, cvae: int, ch: int, ch_mult: tuple[int, ...],
    depth: int, width: int, heads: int, mlp_ratio: float = 4.0,
) -> ModelConfig:
    vqvae = VQVAEConfig(
        vocab_size=vocab, z_channels=cvae, ch=ch, ch_mult=ch_mult, num_res_blocks=1, using_sa=False,
        using_mid_sa=True, patch_nums=image_ladder,
    )
    var = VARConfig(
        depth=depth, embed_dim=width, num_heads=heads, num_classes=num_classes, patch_nums=image_ladder,
        vocab_size=vocab, cvae=cvae, mlp_ratio=mlp_ratio, cond_drop_rate=0.1,
    )
    return ModelConfig(var=var, vqvae=vqvae)


# The class counts of the two labelling schemes (amskv_jax.train.data: GROUPS and UNICODE_CLASSES).
EMOJI_CLASSES = len(class_names("ranges"))
UNICODE_EMOJI_CLASSES = len(class_names("unicode"))

CONFIGS: dict[str, TrainConfig] = {
    # The embedded model (amskv_jax/assets/emoji32): 32×32 emoji, 8×8 latent, 7 scales (L = 155). 64 channels at
    # full resolution, not 32: GroupNorm(32) over 32 channels standardises each channel per image, and the
    # decoder's last norm then loses how saturated a colour is. ~1.2M + 3.7M params, under 10 MB in bfloat16.
    "emoji32": TrainConfig(
        model=_model(
            image_ladder=(1, 2, 3, 4, 5, 6, 8), num_classes=EMOJI_CLASSES, vocab=512, cvae=8, ch=64, ch_mult=(1, 1, 1),
            depth=6, width=192, heads=3, mlp_ratio=3.0,
        ),
        vqvae_optim=OptimConfig(steps=1200, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.0),
        var_optim=OptimConfig(steps=1500, batch_size=32, lr=1e-3, warmup_steps=100),
    ),
    # The published 256px ladder (10 scales up to a 16×16 latent, L = 680) on every Unicode-grouped OpenMoji emoji
    # (3944, 12 classes), the held-out split unseen. 32×32 images, one 2× downsampling: a 64×64 VQ-VAE step took
    # ~20 s here against ~5 s at 32×32 (batch 32, 2 CPU cores shared with other jobs, noisy); batch 16 keeps the
    # VQ-VAE's CPU run near two hours on a shared machine. The VAR takes ~9 s a step at batch 32 on an idle 2-core
    # CPU (L = 680 tokens); batch 16 for 2000 steps (32k samples, 9 epochs of the train split, ~2.5 h idle) fits
    # the budget of two sessions shared with other work, where batch 32 for 1500 steps (~3.8 h idle) did not.
    # That run (2000 steps, no mirror images) reached a held-out NLL 28% above its train NLL (bench/RESULTS.md
    # §13): the VAR now also sees every emoji mirrored (twice the data) for 1500 steps (3.4 passes over it), and
    # logs the NLL of 128 train and 128 held-out images every 100 steps (eval_log.csv).
    "emoji16l": TrainConfig(
        model=_model(
            image_ladder=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=UNICODE_EMOJI_CLASSES, vocab=512, cvae=8,
            ch=64, ch_mult=(1, 1), depth=6, width=192, heads=3, mlp_ratio=3.0,
        ),
        vqvae_optim=OptimConfig(steps=800, batch_size=16, lr=2e-3, warmup_steps=50, weight_decay=0.0, save_every=50),
        var_optim=OptimConfig(steps=1500, batch_size=16, lr=1e-3, warmup_steps=100, save_every=100),
        scheme="unicode",
        split="train",
        flip=True,
    ),
    # For tests: 16×16 images, 3 scales, a one-block VAR; trains in seconds.
    "tiny16": TrainConfig(
        model=_model(
            image_ladder=(1, 2, 4), num_classes=EMOJI_CLASSES, vocab=64, cvae=4, ch=32, ch_mult=(1, 2, 2),
            depth=1, width=64, heads=1,
        ),
        vqvae_optim=OptimConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, weight_decay=0.0, save_every=10),
        var_optim=OptimConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, save_every=10),
        classifier_optim=OptimConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=2, save_every=10),
        max_per_group=2,
    ),
}


def get_config(name: str) -> TrainConfig:
    if name not in CONFIGS:
        raise UserError(f"unknown training config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]
