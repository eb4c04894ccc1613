"""Model parameters: random initialisation, orbax checkpoints, and one call to get a ready model.

A checkpoint directory holds `config.json` (the `ModelConfig`) and `params/` (an orbax checkpoint of
`{"var": ..., "vqvae": ...}`, each a Flax variables dict `{"params": ...}`). `load_model(spec)` accepts the name of
an embedded trained model (`EMBEDDED`: shipped in `amskv_jax/assets/`), a preset name (seeded random weights, said so
in its description) or such a directory.
"""
from __future__ import annotations

import dataclasses
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from amskv_jax import integrity
from amskv_jax.config import PRESETS, ModelConfig, get_preset
from amskv_jax.errors import UserError
from amskv_jax.lazy import save_arrays
from amskv_jax.untrusted import CheckedDirectory, open_checkpoint, param_shapes, read_params, show, write_atomic
from amskv_jax.var import stack_blocks


ASSETS = Path(__file__).parent / "assets"
# Trained models shipped with the package (see README "The embedded models"); DEFAULT_MODEL is the main job's.
EMBEDDED = {"emoji32": ASSETS / "emoji32", "emoji16l": ASSETS / "emoji16l"}
DEFAULT_MODEL = "emoji32"


@dataclasses.dataclass(frozen=True)
class Model:
    """A ready model. From files beside the params, when the directory has them: `classes` names the class labels
    (`classes.json`); `calibration` is its AMS-KV calibration (`layers.json`, written by `amskv_jax.calibrate`), the
    default choice of cache-demanding layers for this model."""

    config: ModelConfig
    params: dict
    description: str
    classes: tuple[str, ...] | None = None
    calibration: dict | None = None


def init_once(init: Callable, *args):
    """`init(*args)` as one jitted program compiled with the backend's optimisations off: a Flax module's own
    initialisers (e.g. `Module.init`), run once, so compiling them costs more than running them (tiny16's VQ-VAE: 4 s
    instead of 15 s; eager, every initialiser and draw would compile on its own).

    Which to use: `init_once` when the initial values matter, i.e. training starts from them (the trainers, the
    classifier); `init_params` when only the shapes matter (random-weight presets for timing, memory and shape
    checks), where it is far faster for large models; `param_shapes` when not even values are needed."""
    return jax.jit(init).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params with the reference's tree and shapes, as host numpy arrays (`jax.device_put` them to keep them
    on a device): kernels and embeddings uniform with std 1/sqrt(fan-in) (embeddings 0.02), biases 0, norm scales 1,
    the attention logit scale log 4.

    Drawn in numpy from `param_shapes`, in seconds: Flax's own initialisers, eager or jitted, take minutes for d16
    on 2 CPU cores (one threefry program per parameter shape to compile, then slow draws). Random-weight presets
    serve timing, memory and shape checks, which need only the shapes; trained weights come from a checkpoint."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf) -> np.ndarray:
        name = getattr(path[-1], "key", str(path[-1]))
        shape = tuple(leaf.shape)
        if name in ("bias", "q_bias", "v_bias"):
            return np.zeros(shape, np.float32)
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "scale_mul_1H11":
            return np.full(shape, np.log(4.0), np.float32)
        std = 1.0 / math.sqrt(max(1, _fan_in(path, shape))) if name == "kernel" else 0.02
        uniform = rng.random(shape, dtype=np.float32)  # uniform on ±√3·std has that std; far faster than normals
        uniform -= np.float32(0.5)
        uniform *= np.float32(2 * math.sqrt(3) * std)
        return uniform

    return jax.tree_util.tree_map_with_path(fill, param_shapes(config))


def _fan_in(path, shape: tuple[int, ...]) -> int:
    """Input features of a kernel: stacked blocks carry a leading depth axis, and mat_qkv's kernel [C, 3, H, Dh]
    (DenseGeneral) has C inputs; Dense [in, out] and conv [kh, kw, in, out] kernels read every axis but the last."""
    names = [getattr(p, "key", str(p)) for p in path]
    if "blocks" in names:
        shape = shape[1:]
    return shape[0] if "mat_qkv" in names else math.prod(shape[:-1])


class MissingVQVAEError(UserError):
    """A checkpoint directory without a VQ-VAE (converted without one), asked for by code that decodes images."""

    FIX = ("convert it again with the VQ-VAE the reference publishes beside its VAR checkpoints: "
           "python -m convert.from_torch VAR.pth --vae vae_ch160v4096z32.pth")


def save_checkpoint(directory: str | Path, config: ModelConfig, params: dict) -> Path:
    """Write config.json, an orbax checkpoint of params and, last, the checksum manifest under `directory` (created;
    must not hold params/). Every checkpoint directory this package writes goes through here. Leaves may be
    `amskv_jax.lazy.LazyArray`s: they are read one at a time while writing (and once more for the manifest)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / integrity.MANIFEST).unlink(missing_ok=True)
    save_arrays(directory / "params", params)
    write_atomic(directory / "config.json", config.to_json())
    integrity.write_manifest(directory, params)
    return directory


def load_checkpoint(directory: str | Path, verify: bool | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) of a directory written by `save_checkpoint`, after the gate (`untrusted.open_checkpoint`:
    paths, file kinds and sizes, config, manifest, every array's declared dtype and shape) and, unless `verify` is
    False (None: unless AMSKV_SKIP_VERIFY is set), every array's checksum. A directory without a manifest loads with
    a one-line notice on stderr."""
    config, params, _ = _load(open_checkpoint(directory), verify)
    return config, params


def _load(checked: CheckedDirectory, verify: bool | None) -> tuple[ModelConfig, dict, CheckedDirectory]:
    if checked.manifest is None:
        print(f"notice: {checked.shown} has no {integrity.MANIFEST} (written before checksums existed, or "
              f"incompletely); loading it unverified. Add one: python -m amskv_jax.integrity write "
              f"{show(shlex.quote(str(checked.root)))}", file=sys.stderr)
    params = read_params(checked)
    if checked.manifest is not None and (integrity.verify_by_default() if verify is None else verify):
        integrity.check_arrays(checked.root, checked.manifest, params)
    return checked.config, upgrade_params(params, checked.config, checked.shown), checked


def upgrade_params(params: dict, config: ModelConfig, source: str, log=print) -> dict:
    """Params written before the blocks were stacked (`blocks_0` … keys) re-stacked into this layout, with a
    one-line notice (`stack_blocks`); params already in it are returned as they are."""
    var = params.get("var", {}).get("params", {})  # a VQ-VAE-only training run has no "var"
    if "blocks_0" not in var:
        return params
    log(f"{source}: per-block params (blocks_0 …) re-stacked on load; re-save the model to skip this step")
    return {**params, "var": {**params["var"], "params": stack_blocks(var, config.var.num_heads)}}


def load_model(spec: str = DEFAULT_MODEL, verify: bool | None = None, *, need_vqvae: bool = True) -> Model:
    """An embedded trained model's name, a preset name (random weights) or a checkpoint directory (`verify`: as
    `load_checkpoint`).

    A directory without a VQ-VAE (converted without `--vae`) raises MissingVQVAEError, naming it and the command that
    adds one, before its params are read; `need_vqvae=False` loads it anyway (for code that never decodes images)."""
    kind = model_kind(spec)
    if kind == "embedded":
        if not (EMBEDDED[spec] / "config.json").is_file():
            raise FileNotFoundError(f"the embedded model {spec!r} is missing from {EMBEDDED[spec]}; reinstall")
        config, params, checked = _load(open_checkpoint(EMBEDDED[spec]), verify)
        return Model(config, params, f"embedded model {spec} (trained on OpenMoji emoji)", checked.classes,
                     checked.calibration)
    if kind == "preset":
        return Model(get_preset(spec), init_params(get_preset(spec)), f"preset {spec}, random weights (seed 0)")
    checked = open_checkpoint(spec)
    if need_vqvae and not checked.has_vqvae:
        raise MissingVQVAEError(
            f"{checked.shown} holds a VAR without a VQ-VAE (converted without --vae), so it cannot generate "
            f"images; rm -r {show(shlex.quote(spec))}, then {MissingVQVAEError.FIX} --out {show(shlex.quote(spec))}"
        )
    config, params, _ = _load(checked, verify)
    return Model(config, params, f"checkpoint {checked.shown}", checked.classes, checked.calibration)


def model_kind(spec: str) -> str:
    """What `--model SPEC` names, in the order every command resolves it: "embedded", "preset" or "directory";
    anything else raises `unknown_model`'s one line."""
    if spec in EMBEDDED:
        return "embedded"
    if spec in PRESETS:
        return "preset"
    if Path(spec).is_dir():
        return "directory"
    raise unknown_model(spec)


def unknown_model(spec: str) -> UserError:
    return UserError(
        f"model {show(repr(spec))} is neither an embedded model ({', '.join(EMBEDDED)}), a preset "
        f"({', '.join(PRESETS)}) nor a checkpoint directory"
    )
