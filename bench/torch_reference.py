"""The PyTorch reference's generation time with our weights loaded into it (optional: needs torch and a checkout of
FoundationVision/VAR), for `python -m bench.run --torch-reference PATH`."""
from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from amskv_jax.errors import UserError
from amskv_jax.generate import default_top_k
from amskv_jax.var import unstack_blocks
from bench.measure import CFG, TOP_P, Model, spread
from convert.mapping import _flatten, is_buffer, torch_key_to_path


def params_to_state_dict(params: dict, torch_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Our Flax params as a torch state dict with the given keys (the inverse of `convert.mapping`): every key of
    `torch_shapes` that is not a recomputed buffer is looked up through `torch_key_to_path`, its layout undone
    (stacked VAR blocks are first split into the per-block layout, `unstack_blocks`)."""
    flat = _flatten(unstack_blocks(params) if "blocks" in params else params)
    out, problems = {}, []
    for key, shape in torch_shapes.items():
        if is_buffer(key):
            continue
        path = torch_key_to_path(key)
        candidates = [path[:-1] + (leaf,) for leaf in (("kernel", "embedding", "scale") if path[-1] == "weight"
                                                       else (path[-1],))]
        found = [p for p in candidates if p in flat]
        if not found:
            problems.append(f"no parameter for torch key {key!r}")
            continue
        array = np.asarray(flat[found[0]], np.float32)
        if found[0][-1] == "kernel" and array.ndim == 2:
            array = array.T
        elif found[0][-1] == "kernel" and array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)
        if tuple(array.shape) != tuple(shape):
            problems.append(f"{key!r}: ours maps to {array.shape}, torch expects {tuple(shape)}")
            continue
        out[key] = np.ascontiguousarray(array)
    if problems:
        raise UserError("params do not fit the torch model: " + "; ".join(problems[:10]))
    return out


def torch_reference_times(path: Path, models: list[Model], batches: list[int], dtype: str, reps: int,
                          seed: int) -> dict:
    """Time the reference's `VAR.autoregressive_infer_cfg` with our weights loaded into it, per model and batch.
    Runs before JAX touches the accelerator, so the two never share its memory."""
    import torch  # optional extra: only imported with --torch-reference

    sys.path.insert(0, str(path))
    if importlib.util.find_spec("huggingface_hub") is None:  # models/var.py imports it for a mixin only
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub
    from models.var import VAR as TorchVAR
    from models.vqvae import VQVAE as TorchVQVAE

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    bar = tqdm(total=len(models) * len(batches) * (reps + 1), desc="torch reference", unit="run", file=sys.stderr)
    for model in models:
        v, q = model.config.var, model.config.vqvae
        if (q.ch_mult, q.num_res_blocks, q.using_sa, q.using_mid_sa) != ((1, 1, 2, 2, 4), 2, True, True):
            raise UserError(f"{model.name}: the reference's VQ-VAE hard-codes ch_mult (1,1,2,2,4); ours differs")
        vae = TorchVQVAE(vocab_size=q.vocab_size, z_channels=q.z_channels, ch=q.ch, test_mode=True,
                         quant_resi=q.quant_resi, share_quant_resi=q.share_quant_resi, v_patch_nums=q.patch_nums)
        var = TorchVAR(vae, num_classes=v.num_classes, depth=v.depth, embed_dim=v.embed_dim, num_heads=v.num_heads,
                       mlp_ratio=v.mlp_ratio, norm_eps=v.norm_eps, shared_aln=v.shared_aln,
                       cond_drop_rate=v.cond_drop_rate, attn_l2_norm=v.attn_l2_norm, patch_nums=v.patch_nums)
        for module, ours in ((vae, model.params["vqvae"]["params"]), (var, model.params["var"]["params"])):
            shapes = {k: tuple(t.shape) for k, t in module.state_dict().items()}
            sd = {k: torch.from_numpy(a) for k, a in params_to_state_dict(jax.device_get(ours), shapes).items()}
            missing, unexpected = module.load_state_dict(sd, strict=False)
            if unexpected or [k for k in missing if not is_buffer(k)]:
                raise UserError(f"torch load: missing {missing[:5]}, unexpected {unexpected[:5]}")
        vae, var = vae.to(device).eval(), var.to(device).eval()
        top_k = default_top_k(model.config)
        for batch in batches:
            labels = torch.as_tensor(np.arange(batch) % v.num_classes, device=device)
            autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))
            times, status = [], "ok"
            try:
                for rep in range(reps + 1):  # the first is the warm-up
                    bar.set_postfix_str(f"{model.name} b{batch}")
                    with torch.inference_mode(), autocast:
                        sync()
                        start = time.perf_counter()
                        var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=seed + rep, cfg=CFG,
                                                     top_k=top_k, top_p=TOP_P, more_smooth=False)
                        sync()
                    if rep:
                        times.append(time.perf_counter() - start)
                    bar.update(1)
            except torch.cuda.OutOfMemoryError:
                status = "OOM"
                torch.cuda.empty_cache()
            row = {"model": model.name, "batch": batch, "status": status, "device": device,
                   "weights": f"ours ({model.weights}), loaded into the reference", "dtype": dtype}
            if times:
                row.update({f"{k}_s" if k != "runs" else k: val for k, val in spread(times).items()})
                row["images_per_s"] = batch / row["median_s"]
            out[(model.name, batch)] = row
        del vae, var
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return out

