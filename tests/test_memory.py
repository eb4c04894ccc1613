"""Exact K/V memory: the figures equal the compiled programs' buffers (bf16 and int8 storage), meet the goals, and
the CLI's JSON; the compiled `generate`'s figures and the search for the largest batch that fits."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from amskv_jax.cache import init_cache
from amskv_jax.config import get_preset
from amskv_jax.memory import (
    MAX_BATCH, ProgramMemory, abstract_params, largest_batch, layout_bytes, load_model_files, main, memory_table, parse_bytes,
    reference_bytes, transient_kv_bytes,
)
from amskv_jax.policies import POLICIES, policy_from_name
from amskv_jax.var import VAR, SelfAttention

LADDER = get_preset("tiny-ladder256").var


def _nbytes(tree) -> int:
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4"])
def test_cache_bytes_are_exactly_the_cache_arguments_of_the_compiled_programs(kv_dtype):
    """XLA's `memory_analysis()` of a program taking the cache counts exactly `cache_bytes` for it, for every
    policy; and the generation's last-scale step program takes exactly params + inputs + `cache_bytes`. For int8
    storage the figures include the float32 scales."""
    rows = 6
    make = lambda layout: init_cache(  # noqa: E731
        layout, rows, LADDER.num_heads, LADDER.head_dim, jnp.bfloat16, kv_dtype=kv_dtype
    )
    for name in POLICIES:
        layout = policy_from_name(name, LADDER).layout(LADDER)
        cache = jax.eval_shape(lambda: make(layout))
        assert (cache.kinds[0].scales is not None) == (kv_dtype is not None)
        reader = jax.jit(lambda c: jax.tree.map(lambda a: a.astype(jnp.float32).sum(), c)).lower(cache).compile()
        static, _ = layout_bytes(layout, LADDER, rows // 2, "bfloat16", kv_dtype)
        assert reader.memory_analysis().argument_size_in_bytes == static == _nbytes(cache), name

    layout = policy_from_name("amskv", LADDER).layout(LADDER)
    model = VAR(LADDER, dtype=jnp.bfloat16)
    x_full = jnp.zeros((1, LADDER.seq_len - LADDER.first_l, LADDER.cvae))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,), jnp.int32), x_full)
    cache = jax.eval_shape(lambda: make(layout))
    x = jax.ShapeDtypeStruct((rows, 256, LADDER.embed_dim), jnp.float32)
    cond = jax.ShapeDtypeStruct((rows, LADDER.embed_dim), jnp.float32)
    step = jax.jit(lambda *a: model.apply(*a, 9, layout, method=VAR.step), keep_unused=True)
    analysis = step.lower(params, x, cond, cache).compile().memory_analysis()
    static, _ = layout_bytes(layout, LADDER, rows // 2, "bfloat16", kv_dtype)
    assert analysis.argument_size_in_bytes - _nbytes((params, x, cond)) == static


def test_peak_adds_exactly_one_layers_fresh_kv_of_the_last_scale():
    """The transient is what the compiled `_qkv` outputs for K and V of the last scale, in the cache dtype."""
    rows = 6
    attn = SelfAttention(LADDER, dtype=jnp.bfloat16)
    x = jnp.zeros((rows, 256, LADDER.embed_dim), jnp.bfloat16)
    params = jax.eval_shape(attn.init, jax.random.key(0), x, jnp.ones((256, 256), bool))
    fresh_kv = jax.jit(lambda p, x: attn.apply(p, x, method=SelfAttention._qkv)[1:]).lower(params, x).compile()
    kv_bytes = fresh_kv.memory_analysis().output_size_in_bytes - 2 * 8  # minus the output tuple's two pointers
    assert kv_bytes == transient_kv_bytes(LADDER, rows, "bfloat16")
    for name in POLICIES:
        static, peak = layout_bytes(policy_from_name(name, LADDER).layout(LADDER), LADDER, rows // 2, "bfloat16")
        assert peak - static == kv_bytes


def test_d30_figures_at_batch_128_meet_the_goals():
    config = get_preset("d30").var
    rows = {row.policy: row for row in memory_table(config, 128, "bfloat16")}
    per_slot = 2 * 256 * config.embed_dim * 2  # K and V, 256 rows, bf16
    assert rows["full"].cache_bytes == 30 * 424 * per_slot + 4 * 30 * 424
    assert rows["reference"].cache_bytes == 30 * 680 * per_slot  # 37.4 GiB (AMSKV.md §4)
    assert reference_bytes(config, 128, "bfloat16", fp32_k=True) == rows["reference"].cache_bytes * 3 // 2
    assert rows["amskv"].default and not any(row.default for name, row in rows.items() if name != "amskv")
    assert rows["amskv"].reduction_vs_full >= 0.80 and rows["amskv-90"].reduction_vs_full >= 0.90
    assert rows["full"].peak_kv_bytes - rows["full"].cache_bytes == 2 * 256 * 256 * config.embed_dim * 2


def test_d30_int8_and_float8_storage_count_their_scales_and_cut_against_the_bf16_full_cache():
    config = get_preset("d30").var
    table = memory_table(config, 128, "bfloat16", kv_dtypes=(None, "int8", "float8_e4m3fn"))
    rows = {(row.policy, row.kv_dtype): row for row in table}
    assert len(rows) == len(table) == 3 * len(POLICIES) + 1
    heads, dh = config.num_heads, config.head_dim
    # full cache: 424 slots and all 9 cached scales' K groups live per layer; 256 rows
    scales = 4 * 256 * heads * (9 * dh + 424) * 30
    int8_full = rows["full", "int8"]
    assert int8_full.cache_bytes == 30 * 424 * 2 * 256 * config.embed_dim + 4 * 30 * 424 + scales
    assert rows["full", "float8_e4m3fn"].cache_bytes == int8_full.cache_bytes
    bf16 = rows["full", "bfloat16"].cache_bytes
    assert int8_full.reduction_vs_full == pytest.approx(1 - int8_full.cache_bytes / bf16)
    # the transient fresh K/V stay in the compute dtype
    assert int8_full.peak_kv_bytes - int8_full.cache_bytes == 2 * 256 * 256 * config.embed_dim * 2
    amskv = rows["amskv", "int8"]
    assert amskv.cache_bytes < 0.6 * rows["amskv", "bfloat16"].cache_bytes and amskv.reduction_vs_full >= 0.9


def test_json_lists_every_policy_full_first_with_the_documented_keys(capsys):
    assert main(["--model", "d30", "--batch", "128", "--dtype", "bfloat16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["policy"] for row in rows] == [*POLICIES, "reference"]
    keys = {"policy", "kv_dtype", "default", "cache_bytes", "peak_kv_bytes", "reduction_vs_full"}
    assert all(set(row) == keys for row in rows)
    assert rows[0]["reduction_vs_full"] == 0.0 and [row["default"] for row in rows].count(True) == 1
    assert {row["kv_dtype"] for row in rows} == {"bfloat16"}


def test_json_with_several_storage_dtypes_repeats_the_policies_per_dtype(capsys):
    assert main(["--model", "d30", "--json", "--kv-dtype", "default", "int8", "float8_e4m3fn"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["policy"], row["kv_dtype"]) for row in rows] == [
        *((name, kv) for kv in ("bfloat16", "int8", "float8_e4m3fn") for name in POLICIES), ("reference", "bfloat16")
    ]
    by = {(row["policy"], row["kv_dtype"]): row for row in rows}
    assert by["amskv", "int8"]["cache_bytes"] < by["amskv", "bfloat16"]["cache_bytes"]


@pytest.mark.parametrize(
    "argv, message",
    [(["--batch", "0"], "--batch must be >= 1"), (["--model", "d17"], "neither an embedded model"),
     (["--dtype", "int8"], "invalid choice"), (["--kv-dtype", "int3"], "invalid choice")],
)
def test_bad_arguments_fail_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_bad_device_memory_is_one_line_naming_the_accepted_forms(capsys):
    for text in ("80", "80 GiB", "80gib", "80GiBs", "-1GB", "0", "1.5", "eighty"):
        if text == "80":
            assert parse_bytes(text) == 80
            continue
        with pytest.raises(SystemExit) as exit_:
            main([f"--device-memory={text}"])
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("python -m amskv_jax.memory: error: --device-memory:"), error
        assert "80GiB" in error and "80GB" in error and "85899345920" in error
    assert parse_bytes("80GiB") == parse_bytes("85899345920") == 80 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("0.5KiB") == 512


def _affine(base: int, per_image: int, step: int = 0, every: int = 1):
    """A fake compile: base + per_image·b bytes, plus `step` per started group of `every` images (the padded chunks
    of the decode), recording the batches it is asked for."""
    asked = []

    def measure(b: int) -> ProgramMemory:
        asked.append(b)
        return ProgramMemory(b, base, 0, per_image * b + step * -(-b // every), 0)

    return measure, asked


@pytest.mark.parametrize("memory", [10**6, 123_457, 999, 5_000])
@pytest.mark.parametrize("step, every", [(0, 1), (70, 3), (1_000, 8)])
def test_largest_batch_is_exact_and_takes_few_compiles(memory, step, every):
    measure, asked = _affine(1_000, 37, step, every)
    fit = largest_batch(measure, memory)
    assert len(asked) == len(set(asked)) == len(fit.compiled) <= (4 if step == 0 else 8), fit.compiled
    expected = max([b for b in range(1, memory // 37 + 1) if measure(b).total_bytes <= memory], default=0)
    assert fit.batch == expected
    assert fit.program is None if expected == 0 else fit.program.total_bytes <= memory


def test_largest_batch_stops_at_max_batch():
    measure, _ = _affine(1_000, 37)
    assert largest_batch(measure, 10**9).batch == MAX_BATCH  # 27 million images would fit


def test_largest_batch_of_a_program_that_grows_faster_than_a_line():
    measure = lambda b: ProgramMemory(b, 500, 0, 3 * b * b, 0)  # noqa: E731
    fit = largest_batch(measure, 10**6)
    assert fit.batch == 577 and len(fit.compiled) <= 16  # 500 + 3·577² ≤ 10⁶ < 500 + 3·578²


def test_model_takes_the_embedded_model_presets_and_directories(tmp_path):
    config, calibration = load_model_files("emoji32")
    assert config.var.depth == 6 and calibration is not None
    assert load_model_files("d30")[0].var.depth == 30
    (tmp_path / "config.json").write_text(get_preset("tiny").to_json())
    assert load_model_files(str(tmp_path)) == (get_preset("tiny"), None)
    assert main(["--model", "emoji32", "--batch", "4"]) == 0


def test_compiled_generate_counts_bf16_weights_and_the_largest_batch_fits(capsys):
    """The program's arguments are the weights it reads, in bfloat16, plus labels and key; its temporaries hold the cache; the
    largest batch's program fits and the next batch's does not."""
    memory = 32 * 2**20  # batch 16 fits, 17 does not: three compiles (the search itself: the tests above)
    assert main(["--model", "tiny", "--batch", "1", "--policy", "amskv", "--compile", "--device-memory", "32MiB",
                 "--layer-loop", "scan", "--json"]) == 0  # batch 1: the table's program is the search's first
    row = json.loads(capsys.readouterr().out)[0]
    program, fit = row["program"], row["largest_batch"]
    assert row["backend"].startswith(jax.default_backend()) and row["layer_loop"] == "scan"
    weights = _nbytes(abstract_params(get_preset("tiny"), "bfloat16"))
    assert 2 * weights == _nbytes(abstract_params(get_preset("tiny"), "float32"))  # every weight cast
    # the weights it reads (not the VQ-VAE's encoder: jit drops unused arguments), the label (int32) and the key
    var_weights = _nbytes(abstract_params(get_preset("tiny"), "bfloat16")["var"])
    assert var_weights < program["argument_bytes"] <= weights + 4 + 64
    assert program["temp_bytes"] > row["cache_bytes"]
    assert fit["device_memory_bytes"] == memory and fit["program"]["total_bytes"] <= memory
    assert fit["batch"] > 2 and fit["batch"] + 1 in fit["compiled_batches"]
    assert fit["cache_bytes"] == layout_bytes(policy_from_name("amskv", get_preset("tiny").var).layout(
        get_preset("tiny").var), get_preset("tiny").var, fit["batch"], "bfloat16")[0]


def test_a_model_directory_is_read_through_the_untrusted_gate(tmp_path, capsys):
    """`--model DIR` reads config.json and layers.json as every loader does: bounded, typed, one line on failure."""
    def refused() -> str:
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(tmp_path)])
        assert exit_.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    (tmp_path / "config.json").write_text("[]")
    assert "config.json: must be an object with exactly the keys var and vqvae" in refused()
    (tmp_path / "config.json").write_text(get_preset("tiny").to_json())
    (tmp_path / "layers.json").write_text('{"format": "something else"}')
    assert "layers.json: not a calibration file" in refused()
