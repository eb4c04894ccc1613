"""The VAR transformer: the cached per-scale path equals teacher forcing; shared AdaLN; config validation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from amskv_jax.cache import init_cache
from amskv_jax.config import VARConfig, get_preset
from amskv_jax.policies import FullCache
from amskv_jax.var import VAR, block_causal_mask


def _random_var_params(cfg: VARConfig, seed: int = 0):
    model = VAR(cfg)
    x = jnp.zeros((1, cfg.seq_len - cfg.first_l, cfg.cvae))
    params = model.init(jax.random.key(seed), jnp.zeros((1,), jnp.int32), x)
    # Perturb every weight so that AdaLN gates and biases matter (init leaves many at zero).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


def cached_logits(model: VAR, params, labels, x_BLCv, layout, dtype=jnp.float32, kv_dtype=None):
    """Run the per-scale cached path on teacher-forcing inputs: (logits [B, L, V], the final cache). Shared by the
    attention and quantisation tests."""
    cfg = model.config
    cond = model.apply(params, labels, method=VAR.condition)
    cache = init_cache(layout, labels.shape[0], cfg.num_heads, cfg.head_dim, dtype, kv_dtype=kv_dtype)
    x = model.apply(params, cond, method=VAR.first_input)
    out = []
    for si in range(cfg.num_scales):
        logits, cache = model.apply(params, x, cond, cache, si, layout, method=VAR.step)
        out.append(logits)
        if si + 1 < cfg.num_scales:
            begin, end = cfg.begin_ends[si + 1]
            x = model.apply(params, si + 1, x_BLCv[:, begin - cfg.first_l : end - cfg.first_l], method=VAR.next_input)
    return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("preset", ["tiny", "tiny-saln", "tiny-ladder256"])
def test_cached_steps_reproduce_teacher_forcing(preset):
    cfg = get_preset(preset).var
    model = VAR(cfg)
    params = _random_var_params(cfg)
    labels = jnp.array([3, 7], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (2, cfg.seq_len - cfg.first_l, cfg.cvae))
    full = model.apply(params, labels, x)
    stepped, _ = jax.jit(cached_logits, static_argnums=(0, 4))(model, params, labels, x, FullCache().layout(cfg))
    rel = float(jnp.abs(stepped - full).max() / jnp.abs(full).max())
    assert rel < 1e-5, rel


def test_block_causal_mask_is_blockwise_lower_triangular():
    mask = block_causal_mask((1, 2, 3))
    assert mask.shape == (14, 14)
    assert mask[0].sum() == 1 and mask[1:5].sum(axis=1).tolist() == [5] * 4 and mask[5:].all()


def test_bad_config_fails_with_allowed_values():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        VARConfig(depth=2, embed_dim=130, num_heads=4)
    with pytest.raises(ValueError, match="unknown preset 'd17'.*d16"):
        get_preset("d17")
