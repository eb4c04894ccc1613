"""The VAR transformer: the cached per-scale path equals teacher forcing (under every policy's mask); shared AdaLN;
stacked block params; config validation."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amskv_jax.cache import init_cache, teacher_mask
from amskv_jax.config import VARConfig, get_preset
from amskv_jax.errors import UserError
from amskv_jax.policies import AMSKV, POLICIES, FullCache, policy_from_name
from amskv_jax.var import VAR, block_causal_mask, stack_blocks, unstack_blocks
from conftest import random_params


def _random_var_params(preset: str, cfg: VARConfig | None = None):
    """The VAR variables of `random_params` for a preset (with its VAR config replaced by `cfg`, if given)."""
    config = get_preset(preset)
    return random_params(config if cfg is None else dataclasses.replace(config, var=cfg))["var"]


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
    params = _random_var_params(preset)
    labels = jnp.array([3, 7], jnp.int32)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, cfg.seq_len - cfg.first_l, cfg.cvae), np.float32))
    full = model.apply(params, labels, x)
    stepped, _ = jax.jit(cached_logits, static_argnums=(0, 4))(model, params, labels, x, FullCache().layout(cfg))
    rel = float(jnp.abs(stepped - full).max() / jnp.abs(full).max())
    assert rel < 1e-5, rel


def test_block_causal_mask_is_blockwise_lower_triangular():
    mask = block_causal_mask((1, 2, 3))
    assert mask.shape == (14, 14)
    assert mask[0].sum() == 1 and mask[1:5].sum(axis=1).tolist() == [5] * 4 and mask[5:].all()


def test_bad_config_fails_with_allowed_values():
    with pytest.raises(UserError, match="not divisible by num_heads"):
        VARConfig(depth=2, embed_dim=130, num_heads=4)
    with pytest.raises(UserError, match="unknown preset 'd17'.*d16"):
        get_preset("d17")


def _policy_layouts(cfg: VARConfig):
    """Every named policy's layout whose storage is the compute dtype (MiKV's low-precision tiers are checked
    against teacher forcing in `test_precision.py`), and AMS-KV with interleaved demanding layers (kinds alternate
    in depth)."""
    layouts = {name: policy_from_name(name, cfg).layout(cfg) for name in POLICIES}
    layouts = {name: layout for name, layout in layouts.items()
               if all(plan.low is None and plan.kv_dtype is None for plan in layout.layers)}
    assert len(layouts) >= len(POLICIES) - 2
    layouts["amskv-interleaved"] = AMSKV(budgets=(5, 14, 5, 14, 5)).layout(cfg)
    return layouts


def _teacher_under_masks(model: VAR, params, labels, x, masks_DLL):
    """Teacher forcing with per-layer masks [D, L, L] given as an array (`VAR.teacher_states(masks=...)`, one kind
    per layer), so that one compiled program serves every layout."""
    masks = (masks_DLL, np.arange(model.config.depth))
    return model.apply(params, labels, x, keep=False, masks=masks, method=VAR.teacher_states)[0]


def test_teacher_forcing_under_each_policy_equals_its_cached_steps():
    """At every layer, the policy-masked teacher-forced logits equal the cached per-scale logits on the same tokens
    (float32): the teacher mask is exactly what generation under that layout attends to."""
    cfg = dataclasses.replace(get_preset("tiny").var, depth=5)  # 5 layers: AMS-KV has a demanding one
    model = VAR(cfg)
    params = _random_var_params("tiny", cfg)
    labels = jnp.array([3, 7], jnp.int32)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, cfg.seq_len - cfg.first_l, cfg.cvae), np.float32))
    teacher = jax.jit(functools.partial(_teacher_under_masks, model))
    stepped = jax.jit(cached_logits, static_argnums=(0, 4))
    unmasked = model.apply(params, labels, x)
    layouts = _policy_layouts(cfg)
    for name, layout in layouts.items():
        masks = teacher_mask(layout)[np.asarray(layout.kind_of)]  # per layer
        masked = teacher(params, labels, x, masks)
        if name == "full":  # the masks as an argument give the model's own teacher forcing
            np.testing.assert_allclose(masked, unmasked, rtol=0, atol=1e-5 * float(jnp.abs(unmasked).max()))
        cached, _ = stepped(model, params, labels, x, layout)
        rel = float(jnp.abs(cached - masked).max() / jnp.abs(masked).max())
        assert rel < 1e-5, (name, rel)
        if [p.reads for p in layout.layers] != [p.reads for p in layouts["full"].layers]:  # the masks matter
            assert float(jnp.abs(masked - unmasked).max()) > 1e-3, name
    assert teacher._cache_size() == 1
    # and the model's own entry point under a layout with several kinds gives the same
    interleaved = layouts["amskv-interleaved"]
    per_layer = teacher_mask(interleaved)[np.asarray(interleaved.kind_of)]
    own = model.apply(params, labels, x, interleaved)
    np.testing.assert_allclose(teacher(params, labels, x, per_layer), own, rtol=0, atol=1e-6 * float(jnp.abs(own).max()))


def test_teacher_mask_of_the_full_cache_is_block_causal_and_kinds_follow_the_layers():
    cfg = get_preset("tiny-ladder256").var
    full = FullCache().layout(cfg)
    np.testing.assert_array_equal(teacher_mask(full), block_causal_mask(cfg.patch_nums)[None])
    layout = AMSKV(budgets=(5, 274, 5, 5)).layout(dataclasses.replace(cfg, depth=4))  # 274: condensed + 7, 8
    assert layout.kind_of == (0, 1, 0, 0) and layout.kind_index == (0, 0, 1, 2) and layout.kind_sizes == (3, 1)
    masks = teacher_mask(layout)
    level = np.concatenate([np.full(pn * pn, si) for si, pn in enumerate(cfg.patch_nums)])
    last = level == 9
    assert set(level[masks[0][last].any(0)]) == {0, 1, 9}
    assert set(level[masks[1][last].any(0)]) == {0, 1, 7, 8, 9}


def test_stacked_params_round_trip_through_the_per_block_layout():
    cfg = get_preset("tiny").var
    params = _random_var_params("tiny")["params"]
    per_block = unstack_blocks(params)
    assert "blocks" not in per_block and per_block["blocks_1"]["attn"]["mat_qkv"]["kernel"].shape == (128, 384)
    back = stack_blocks(per_block, cfg.num_heads)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)
