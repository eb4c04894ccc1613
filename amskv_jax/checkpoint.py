"""Model parameters: random initialisation, orbax checkpoints, and one call to get a ready model.

A checkpoint directory holds `config.json` (the `ModelConfig`) and `params/` (an orbax checkpoint of
`{"var": ..., "vqvae": ...}`, each a Flax variables dict `{"params": ...}`). `load_model(spec)` accepts the name of
an embedded trained model (`EMBEDDED`: shipped in `amskv_jax/assets/`), a preset name (seeded random weights, said so
in its description) or such a directory.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from amskv_jax.config import PRESETS, ModelConfig, get_preset
from amskv_jax.lazy import save_arrays
from amskv_jax.var import VAR
from amskv_jax.vqvae import VQVAE


ASSETS = Path(__file__).parent / "assets"
# Trained models shipped with the package (see README "The embedded model"); the first is the default.
EMBEDDED = {"emoji32": ASSETS / "emoji32"}
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


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params with the reference's shapes: {"var": variables, "vqvae": variables}."""
    var_key, vae_key = jax.random.split(jax.random.key(seed))
    c = config.var
    labels = jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1, c.seq_len - c.first_l, c.cvae), jnp.float32)
    var_params = VAR(c).init(var_key, labels, x)
    img = jnp.zeros((1, config.vqvae.image_size, config.vqvae.image_size, 3), jnp.float32)
    vae_params = VQVAE(config.vqvae).init(vae_key, img)
    return {"var": var_params, "vqvae": vae_params}


class MissingVQVAEError(ValueError):
    """A checkpoint directory without a VQ-VAE (converted without one), asked for by code that decodes images."""


def save_checkpoint(directory: str | Path, config: ModelConfig, params: dict) -> Path:
    """Write config.json and an orbax checkpoint of params under `directory` (created; must not hold params/).
    Leaves may be `amskv_jax.lazy.LazyArray`s: they are read one at a time while writing."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    save_arrays(directory / "params", params)
    (directory / "config.json").write_text(config.to_json())
    return directory


def load_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict]:
    directory = Path(directory).absolute()
    config_file = directory / "config.json"
    if not config_file.is_file() or not (directory / "params").is_dir():
        raise FileNotFoundError(f"{directory}: not a checkpoint directory (needs config.json and params/)")
    config = ModelConfig.from_json(config_file.read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params")
    return config, params


def has_vqvae(directory: str | Path) -> bool:
    """Whether the checkpoint directory holds a VQ-VAE (read from orbax's metadata, not the params)."""
    with ocp.StandardCheckpointer() as checkpointer:
        return "vqvae" in checkpointer.metadata(Path(directory).absolute() / "params").item_metadata


def load_model(spec: str = DEFAULT_MODEL, *, need_vqvae: bool = True) -> Model:
    """An embedded trained model's name, a preset name (random weights) or a checkpoint directory.

    A directory without a VQ-VAE (converted without `--vae`) raises MissingVQVAEError, naming it and the command that
    adds one, before its params are read; `need_vqvae=False` loads it anyway (for code that never decodes images)."""
    if spec in EMBEDDED:
        if not (EMBEDDED[spec] / "config.json").is_file():
            raise FileNotFoundError(f"the embedded model {spec!r} is missing from {EMBEDDED[spec]}; reinstall")
        config, params = load_checkpoint(EMBEDDED[spec])
        return Model(config, params, f"embedded model {spec} (trained on OpenMoji emoji)", *_extras(EMBEDDED[spec]))
    if spec in PRESETS:
        return Model(get_preset(spec), init_params(get_preset(spec)), f"preset {spec}, random weights (seed 0)")
    if Path(spec).is_dir():
        if need_vqvae and (Path(spec) / "params").is_dir() and not has_vqvae(spec):
            raise MissingVQVAEError(
                f"{spec} holds a VAR without a VQ-VAE (converted without --vae), so it cannot generate images; convert "
                f"it again with the VQ-VAE: rm -r {shlex.quote(spec)} && python -m convert.from_torch VAR.pth --vae "
                f"vae_ch160v4096z32.pth --out {shlex.quote(spec)} (the reference publishes vae_ch160v4096z32.pth "
                "beside its VAR checkpoints)"
            )
        config, params = load_checkpoint(spec)
        return Model(config, params, f"checkpoint {spec}", *_extras(Path(spec)))
    raise ValueError(
        f"--model {spec!r} is neither an embedded model ({', '.join(EMBEDDED)}), a preset ({', '.join(PRESETS)}) "
        "nor a checkpoint directory"
    )


def _extras(directory: Path) -> tuple[tuple[str, ...] | None, dict | None]:
    """(class names, calibration) from a checkpoint directory; None for each file that is absent."""
    from amskv_jax.policies import read_calibration

    classes = directory / "classes.json"
    calibration = directory / "layers.json"
    return (
        tuple(json.loads(classes.read_text())) if classes.is_file() else None,
        read_calibration(calibration) if calibration.is_file() else None,
    )
