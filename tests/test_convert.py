"""End-to-end checkpoint conversion: parity with the PyTorch reference dumps (`tests/fixtures/*/io.npz`), every input
format to the same params, the `convert.from_torch` command line and its orbax output, and bad input.

Parity goes through `convert.verify.verify`, what a user runs on a reference dump. The fixtures' VQ-VAE is stored in
float16 (`tiny/vae_f16.safetensors`, shared by all three fixtures) while the reference ran float32 weights, so the
figures that pass through the VQ-VAE carry that rounding (see `LOW_PRECISION_VAE_TOLERANCES` in convert/verify.py
and tests/test_vqvae.py); everything that does not touch the VQ-VAE is held to the float32 contract:
* teacher-forced logits, every block's output, and the same teacher-forced input run scale by scale through the
  cached generation step (`VAR.step`): relative error <= 1e-4;
* greedy generation: scale 0's logits (class embedding only) <= 1e-4; later scales' logits <= 5e-4 (their input is
  the float16 VQ-VAE's codebook through the Φ convs; measured at most 2.0e-4, ladder256); tokens identical;
* images: <= 1.5e-2 max abs on [0, 1] instead of 1e-3 (decoded by the float16 VQ-VAE; measured at most 6.4e-3; this
  is tests/test_vqvae.py's 3e-2 on [-1, 1]).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from amskv_jax.checkpoint import MissingVQVAEError, load_checkpoint, load_model
from amskv_jax.generate import generate
from amskv_jax.untrusted import open_checkpoint
from convert import from_torch, verify
from convert.from_torch import ConversionError, convert, count_params
from convert.mapping import MappingError, is_buffer
from convert.torch_pickle import CheckpointError, load_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
VAE = TINY / "vae_f16.safetensors"
REPO = Path(__file__).parent.parent

LOGITS_RTOL = 1e-4  # float32 contract: teacher-forced / cached-step logits, block outputs, scale-0 logits
VAE_LOGITS_RTOL = 5e-4  # generation logits after scale 0: input from the float16 VQ-VAE (measured <= 2.0e-4)
IMAGE_ATOL = 1.5e-2  # images decoded by the float16 VQ-VAE, on [0, 1] (measured <= 6.4e-3; float32 VAE: 1e-3)
BF16_RTOL = 2e-2  # teacher-forced logits from the bfloat16 checkpoint


def _quiet(*_):
    pass


# ---- parity with the reference, per fixture ---------------------------------------------------------------------

# To keep this file fast (XLA's CPU compiles dominate: ~17 s for ladder256's generation alone), ladder256 runs
# teacher forcing and generation only: its VQ-VAE-only checks (encoder tokens, f_hat, reconstruction) use tiny's
# VQ-VAE weights, which tiny checks, and its generation already runs the 256 px decoder and every scale's resize
# and Φ; the cached-step check, which tiny and tiny-saln run, would add a second 10-scale compile.
# `python -m convert.verify tests/fixtures/ladder256 --vae tests/fixtures/tiny/vae_f16.safetensors` runs them all.
PARTS = {"tiny": verify.PARTS, "tiny-saln": verify.PARTS, "ladder256": ("teacher", "generation")}


@pytest.fixture(scope="module", params=list(PARTS))
def verified(request):
    """(fixture name, {row name: Row}, io.npz) from one `verify` run per fixture."""
    name = request.param
    rows = verify.verify(FIXTURES / name, vae=VAE, parts=PARTS[name], log=_quiet)
    by_name = {row.name: row for row in rows}
    assert len(by_name) == len(rows), "duplicate row names"
    return name, by_name, np.load(FIXTURES / name / "io.npz")


def _num_scales(io) -> int:
    return sum(1 for k in io.files if k.startswith("gen_idx_s"))


def test_verify_compares_every_reference_array(verified):
    name, rows, io = verified
    scales = _num_scales(io)
    assert scales == {"tiny": 4, "tiny-saln": 4, "ladder256": 10}[name]
    expected = {"teacher-forced logits"}
    expected |= {f"teacher-forced block {i}" for i in range(2) if f"tf_block{i}_out" in io}
    if "steps" in PARTS[name]:
        expected |= {f"cached step logits s{si}" for si in range(scales)}
    if "vqvae" in PARTS[name]:
        expected |= {"vae f_hat", "vae reconstruction", "vae idx_to_img"}
        expected |= {f"vae tokens s{si} (ref. residual)" for si in range(scales)}
    for p in ("gen", "gen0"):
        expected |= {f"{p} image"} | {f"{p} {what} s{si}" for what in ("logits", "tokens") for si in range(scales)}
    assert set(rows) == expected
    assert name == "ladder256" or "teacher-forced block 1" in rows  # ladder256's dump drops the block outputs
    bad = [f"{r.name}: abs {r.max_abs:.2e} rel {r.max_rel:.2e} agreement {r.agreement}" for r in rows.values()
           if not r.ok()]
    assert not bad, bad


def test_teacher_forced_logits_and_block_outputs_within_1e_4(verified):
    _, rows, _ = verified
    checked = [r for n, r in rows.items() if n.startswith("teacher-forced")]
    assert checked
    for row in checked:
        assert row.max_rel <= LOGITS_RTOL, (row.name, row.max_rel)


@pytest.mark.parametrize("verified", [n for n in PARTS if "steps" in PARTS[n]], indirect=True)
def test_cached_generation_step_reproduces_teacher_forced_logits_within_1e_4(verified):
    """The generation path of the converted VAR, fed the reference's input, independent of the VQ-VAE."""
    name, rows, io = verified
    for si in range(_num_scales(io)):
        row = rows[f"cached step logits s{si}"]
        assert row.max_rel <= LOGITS_RTOL, (row.name, row.max_rel)


def test_generation_logits_per_scale(verified):
    _, rows, io = verified
    for prefix in ("gen", "gen0"):
        assert rows[f"{prefix} logits s0"].max_rel <= LOGITS_RTOL
        for si in range(1, _num_scales(io)):
            row = rows[f"{prefix} logits s{si}"]
            assert row.max_rel <= VAE_LOGITS_RTOL, (row.name, row.max_rel)


def test_greedy_tokens_identical(verified):
    _, rows, io = verified
    for prefix in ("gen", "gen0"):
        for si in range(_num_scales(io)):
            assert rows[f"{prefix} tokens s{si}"].agreement == 1.0, f"{prefix} scale {si}"


def test_images_within_bound(verified):
    _, rows, _ = verified
    names = [n for n in ("gen image", "gen0 image", "vae reconstruction", "vae idx_to_img") if n in rows]
    assert len(names) >= 2
    for name in names:
        assert rows[name].max_abs <= IMAGE_ATOL, (name, rows[name].max_abs)


@pytest.mark.parametrize("verified", [n for n in PARTS if "vqvae" in PARTS[n]], indirect=True)
def test_vqvae_tokens_and_fhat(verified):
    name, rows, io = verified
    for si in range(_num_scales(io)):
        # the reference's tokens at every scale (the f16 rounding moves no code choice on these 64 px fixtures)
        assert rows[f"vae tokens s{si} (ref. residual)"].agreement == 1.0, si
    assert rows["vae f_hat"].max_rel <= 1e-3  # f16 codebook and Φ (measured 2.7e-4; float32 bound 1e-4)


# ---- inputs: formats and dtypes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_var():
    """(config, params) of tiny/var.pth, VAR only."""
    return convert(TINY / "var.pth", log=_quiet)


def _flat(params) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("name", ["var_legacy.pth", "var_ckpt_wrapped.pth", "var.safetensors", "var_bf16.pth"])
def test_every_input_format_converts_to_the_same_params(tiny_var, name):
    config, params = tiny_var
    logged = []
    other_config, other = convert(TINY / name, log=logged.append)
    assert other_config == config
    ours, theirs = _flat(params), _flat(other)
    assert theirs.keys() == ours.keys()
    for key, want in ours.items():
        got = theirs[key]
        assert got.shape == want.shape, key
        if name == "var_bf16.pth":  # the same values rounded to bfloat16 (round to nearest even, as torch casts)
            assert got.dtype == ml_dtypes.bfloat16, key
            np.testing.assert_array_equal(got.view(np.uint16), want.astype(ml_dtypes.bfloat16).view(np.uint16),
                                          err_msg=key)
        else:
            assert got.dtype == want.dtype == np.float32, key
            np.testing.assert_array_equal(got, want, err_msg=key)
    if name == "var_ckpt_wrapped.pth":
        assert any("trainer.var_wo_ddp" in line for line in logged), logged


def test_bfloat16_checkpoint_teacher_forced_logits_within_2e_2():
    config, params = convert(TINY / "var_bf16.pth", log=_quiet)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params))
    io = np.load(TINY / "io.npz")
    teacher, _ = verify._var_programs(config.var)  # the program verify compiled for tiny
    upcast = jax.tree.map(lambda x: np.asarray(x, np.float32), params["var"])
    logits, _ = teacher(upcast, np.asarray(io["tf_label"], np.int32), np.asarray(io["tf_x_BLCv"], np.float32))
    row = verify.compare("bf16 teacher-forced logits", "logits", logits, io["tf_logits"])
    assert row.max_rel <= BF16_RTOL, row.max_rel
    assert row.max_rel > 1e-5  # the bfloat16 rounding is really there


# ---- the command line and its output ----------------------------------------------------------------------------

def _expected_var_param_count() -> int:
    keys = json.loads((TINY / "keys.json").read_text())["var"]
    return sum(int(np.prod(shape)) for key, shape, _ in keys if not is_buffer(key))


@pytest.fixture(scope="module")
def cli_output(tmp_path_factory):
    """`python -m convert.from_torch` in a fresh interpreter: (completed process, output directory)."""
    out = tmp_path_factory.mktemp("cli") / "tiny_flax"
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # conversion needs no accelerator; don't compete for its memory
    proc = subprocess.run(
        [sys.executable, "-m", "convert.from_torch", str(TINY / "var.pth"), "--vae", str(VAE), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    return proc, out


def test_cli_writes_checkpoint_and_prints_summary(cli_output, tiny_var):
    proc, out = cli_output
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "params").is_dir() and (out / "checksums.json").is_file()
    text = proc.stdout
    assert "preset: tiny;" in text and "depth 2, width 128, 2 heads, ladder (1, 2, 3, 4)" in text
    assert f"VAR {_expected_var_param_count():,}" in text and f"VAR {count_params(tiny_var[1]):,}" in text
    assert "VQ-VAE 4,378,587" in text
    assert "dtype float32" in text and str(out) in text


def test_cli_checkpoint_loads_and_generates_the_reference_tokens(cli_output, tiny_var):
    _, out = cli_output
    model = load_model(str(out))
    assert model.config.var == tiny_var[0].var
    saved = _flat(model.params["var"])
    for key, want in _flat(tiny_var[1]["var"]).items():
        np.testing.assert_array_equal(np.asarray(saved[key]), want, err_msg=key)
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(model.params))
    io = np.load(TINY / "io.npz")
    gen = generate(model.params, io["gen_label"].astype(np.int32), jax.random.key(0), config=model.config,
                   cfg=float(io["gen_cfg"]), top_k=1, top_p=0.0, return_logits=True)
    for si, tokens in enumerate(gen.tokens):
        np.testing.assert_array_equal(tokens, io[f"gen_idx_s{si}"], err_msg=f"scale {si}")
    assert gen.images.shape == (2, 64, 64, 3)
    assert np.abs(gen.images - np.transpose(io["gen_img"], (0, 2, 3, 1))).max() <= IMAGE_ATOL


def test_cli_dtype_bfloat16_stores_bfloat16(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert from_torch.main([str(TINY / "var.pth"), "--vae", str(VAE), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "dtype bfloat16" in capsys.readouterr().out
    _, params = load_checkpoint(out)
    dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(params)}
    assert dtypes == {np.dtype(ml_dtypes.bfloat16)}


def test_cli_refuses_an_existing_checkpoint(cli_output, capsys):
    _, out = cli_output
    with pytest.raises(SystemExit) as exc:
        from_torch.main([str(TINY / "var.pth"), "--out", str(out)])
    assert exc.value.code == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_cli_finds_the_vqvae_beside_the_var_checkpoint(tmp_path, capsys):
    shutil.copy(TINY / "var.pth", tmp_path / "var_d30.pth")
    shutil.copy(VAE, tmp_path / "vae_ch160v4096z32.pth")  # the published name (safetensors is told by its content)
    assert from_torch.main([str(tmp_path / "var_d30.pth")]) == 0
    captured = capsys.readouterr()
    assert f"VQ-VAE: {tmp_path / 'vae_ch160v4096z32.pth'} (found beside var_d30.pth" in captured.out
    assert "VQ-VAE 4,378,587" in captured.out and "warning" not in captured.err
    out = tmp_path / "var_d30_flax"
    assert open_checkpoint(out).has_vqvae and load_model(str(out)).config.vqvae.vocab_size == 512


def test_find_vae_prefers_the_published_name(tmp_path):
    assert from_torch.find_vae(tmp_path) is None
    for name in ("vae_f16.safetensors", "vae_ch160v4096z32.pth"):
        (tmp_path / name).write_bytes(b"")
    assert from_torch.find_vae(tmp_path) == tmp_path / "vae_ch160v4096z32.pth"


@pytest.fixture(scope="module")
def var_only(tmp_path_factory):
    """A checkpoint converted from a VAR file with no VQ-VAE beside it: (directory, captured stdout, stderr)."""
    src = tmp_path_factory.mktemp("var_only")
    shutil.copy(TINY / "var.pth", src / "var.pth")
    out = src / "var_flax"
    proc = subprocess.run([sys.executable, "-m", "convert.from_torch", str(src / "var.pth")], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, proc.stderr


def test_conversion_without_a_vqvae_says_the_result_cannot_generate(var_only):
    out, stdout, stderr = var_only
    assert not open_checkpoint(out).has_vqvae and "no VQ-VAE" in stdout
    assert stderr.startswith("warning: no VQ-VAE") and "cannot generate images until a VQ-VAE is added" in stderr
    assert f"--vae vae_ch160v4096z32.pth --out {out}" in stderr


def test_generate_refuses_a_checkpoint_without_a_vqvae_before_tracing(var_only):
    out, _, _ = var_only
    proc = subprocess.run([sys.executable, "-m", "amskv_jax.generate", "--model", str(out)], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.splitlines()[-1]
    assert f"{out} holds a VAR without a VQ-VAE" in message and "python -m convert.from_torch" in message
    assert "--vae vae_ch160v4096z32.pth" in message and "compiled" not in proc.stdout
    with pytest.raises(MissingVQVAEError, match="holds a VAR without a VQ-VAE"):
        load_model(str(out))
    model = load_model(str(out), need_vqvae=False)
    with pytest.raises(MissingVQVAEError, match="no 'vqvae'"):
        generate(model.params, [1], jax.random.key(0), config=model.config)


@pytest.fixture(scope="module")
def var_sd():
    return load_state_dict(TINY / "var.pth")


def _save(path: Path, sd: dict) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    return path


def test_cli_heads_override(tmp_path, var_sd, capsys):
    # Without L2-normalised attention no tensor records the head count (default C/64): --heads sets it.
    no_l2 = _save(tmp_path / "no_l2.safetensors", {k: v for k, v in var_sd.items() if "scale_mul_1H11" not in k})
    out = tmp_path / "heads4"
    assert from_torch.main([str(no_l2), "--out", str(out), "--heads", "4"]) == 0
    text = capsys.readouterr().out
    assert "preset: none (custom architecture); depth 2, width 128, 4 heads" in text and "no VQ-VAE" in text
    config, _ = load_checkpoint(out)
    assert (config.var.num_heads, config.var.attn_l2_norm) == (4, False)
    config, _ = convert(no_l2, log=_quiet)
    assert config.var.num_heads == 128 // 64

    # A head count that does not divide the width.
    assert from_torch.main([str(no_l2), "--out", str(tmp_path / "heads3"), "--heads", "3"]) == 2
    err = capsys.readouterr().err
    assert str(no_l2) in err and "embed_dim 128 is not divisible by num_heads 3" in err
    assert not (tmp_path / "heads3").exists()

    # With L2-normalised attention the checkpoint fixes the count; a different --heads is refused, naming the key.
    assert from_torch.main([str(TINY / "var.pth"), "--out", str(tmp_path / "h4"), "--heads", "4"]) == 2
    err = capsys.readouterr().err
    assert "var.pth" in err and "scale_mul_1H11" in err and "2 heads" in err and "--heads 4" in err
    config, _ = convert(TINY / "var.pth", heads=2, log=_quiet)
    assert config.var.num_heads == 2


# ---- bad input --------------------------------------------------------------------------------------------------

def _error(path, kind=(ConversionError, MappingError, CheckpointError), **kwargs) -> str:
    with pytest.raises(kind) as exc:
        convert(path, log=_quiet, **kwargs)
    return str(exc.value)


def test_wrong_shape_is_an_error_naming_file_and_key(tmp_path, var_sd):
    sd = dict(var_sd)
    sd["blocks.1.ffn.fc2.weight"] = sd["blocks.1.ffn.fc2.weight"][:, :-1]
    path = _save(tmp_path / "wrong_shape.safetensors", sd)
    message = _error(path, MappingError)
    assert str(path) in message and "'blocks.1.ffn.fc2.weight'" in message
    assert "shape (128, 511)" in message and "expects (512, 128)" in message


def test_missing_key_is_an_error_naming_file_and_key(tmp_path, var_sd):
    sd = {k: v for k, v in var_sd.items() if k != "blocks.1.attn.proj.bias"}
    path = _save(tmp_path / "missing.safetensors", sd)
    message = _error(path)
    assert str(path) in message and "missing key 'blocks.1.attn.proj.bias'" in message


def test_unknown_key_is_an_error_naming_file_and_key(tmp_path, var_sd):
    sd = dict(var_sd, **{"blocks.0.attn.extra_gate": np.ones(4, np.float32)})
    path = _save(tmp_path / "extra.safetensors", sd)
    message = _error(path)
    assert str(path) in message and "unexpected key 'blocks.0.attn.extra_gate'" in message


def test_not_a_var_state_dict(tmp_path):
    message = _error(VAE)  # a VQ-VAE where the VAR is expected
    assert str(VAE) in message and "VQ-VAE" in message and "not a VAR" in message
    path = _save(tmp_path / "other.safetensors", {"encoder.weight": np.ones((4, 4), np.float32)})
    message = _error(path)
    assert str(path) in message and "missing key 'word_embed.weight'" in message and "VAR checkpoint" in message
    # and the VAR where the VQ-VAE is expected
    message = _error(TINY / "var.pth", vae_path=TINY / "var.safetensors")
    assert "var.safetensors" in message and "not a VQ-VAE" in message


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    path = _save(tmp_path / "other.safetensors", {"encoder.weight": np.ones((4, 4), np.float32)})
    assert from_torch.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m convert.from_torch: error: ") and err.count("\n") == 1 and str(path) in err and "Traceback" not in err


# ---- python -m convert.verify: exit status ----------------------------------------------------------------------

def test_verify_cli_passes_a_good_dump(capsys):
    assert verify.main([str(TINY)]) == 0  # finds vae_f16.safetensors next to var.pth
    out = capsys.readouterr().out
    assert "all figures within tolerance" in out and "FAIL" not in out


def test_verify_cli_fails_out_of_tolerance_figures(tmp_path, capsys):
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("var.pth", "config.json"):
        shutil.copy(TINY / name, ref / name)
    io = dict(np.load(TINY / "io.npz"))
    io["tf_logits"] = io["tf_logits"] * (1 + 3e-4)  # relative error 3e-4 > 1e-4
    io["gen_img"] = io["gen_img"].copy()
    io["gen_img"][1, 2, 10, 20] += 0.05  # beyond even the float16 VQ-VAE's bound
    np.savez(ref / "io.npz", **io)
    assert verify.main([str(ref), "--vae", str(VAE)]) == 1
    out = capsys.readouterr().out
    failed = {line[:32].strip() for line in out.splitlines() if line.endswith("FAIL")}
    assert {"teacher-forced logits", "gen image"} <= failed
    assert "cached step logits s3" in failed  # compared with the same (perturbed) reference logits
    assert "gen0 image" not in failed and "OUT OF TOLERANCE" in out


def test_verify_cli_reports_unreadable_input_without_traceback(tmp_path, capsys):
    for name in ("var.pth", "io.npz"):
        shutil.copy(TINY / name, tmp_path / name)
    assert verify.main([str(tmp_path)]) == 2  # no VQ-VAE
    err = capsys.readouterr().err
    assert err.startswith("python -m convert.verify: error: ") and "--vae" in err and err.count("\n") == 1
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4}))
    assert verify.main([str(tmp_path), "--vae", str(VAE)]) == 2
    assert "scale_mul_1H11" in capsys.readouterr().err


def test_verify_uses_float32_bounds_for_a_float32_vqvae(tmp_path):
    """The looser bounds apply only to a float16/bfloat16 VQ-VAE: the same weights upcast to float32 are held to the
    float32 contract, which the float16 rounding (images off by ~5e-3) then visibly breaks."""
    sd = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in load_state_dict(VAE).items()}
    vae32 = _save(tmp_path / "vae32.safetensors", sd)
    rows = {row.name: row for row in verify.verify(TINY, vae=vae32, parts=("generation",), log=_quiet)}
    assert set(rows) == {f"{p} {what}" for p in ("gen", "gen0") for what in
                         ["image"] + [f"{kind} s{si}" for kind in ("logits", "tokens") for si in range(4)]}
    assert rows["gen image"].bound() == 1e-3 and not rows["gen image"].ok()
    assert rows["gen logits s3"].bound() == 1e-4 and not rows["gen logits s3"].ok()  # 1.3e-4, from the VQ-VAE
    assert all(rows[f"gen tokens s{si}"].ok() for si in range(4))
