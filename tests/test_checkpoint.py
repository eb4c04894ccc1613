"""Checkpoints: the shipped model is in the stacked-blocks layout; a directory written in the per-block layout of
earlier versions (`blocks_0` …) loads, re-stacked, with a notice; no written file names the writing machine's paths."""
from __future__ import annotations

import jax
import numpy as np

from amskv_jax.checkpoint import EMBEDDED, init_params, load_checkpoint, load_model, save_checkpoint
from amskv_jax.config import get_preset
from amskv_jax.var import unstack_blocks


def test_shipped_model_is_stored_with_stacked_blocks(capsys):
    model = load_model("emoji32")
    blocks = model.params["var"]["params"]["blocks"]
    c = model.config.var
    assert blocks["attn"]["mat_qkv"]["kernel"].shape == (c.depth, c.embed_dim, 3, c.num_heads, c.head_dim)
    assert not any(k.startswith("blocks_") for k in model.params["var"]["params"])
    assert "re-stacked" not in capsys.readouterr().out, EMBEDDED["emoji32"]


def test_a_per_block_checkpoint_loads_restacked_with_a_notice(tmp_path, capsys):
    config = get_preset("tiny")
    params = jax.tree.map(np.asarray, init_params(config, seed=3))
    old = {**params, "var": {"params": unstack_blocks(params["var"]["params"])}}
    save_checkpoint(tmp_path / "old", config, old)
    # orbax's commit marker would name the directory written to: no path of the writing machine stays in it
    assert (tmp_path / "old" / "params" / "commit_success.txt").read_text() == "Checkpoint commit was successful."
    _, loaded = load_checkpoint(tmp_path / "old")
    out = capsys.readouterr().out
    assert "re-stacked on load" in out and str(tmp_path / "old") in out
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
