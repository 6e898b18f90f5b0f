"""Wan2.1 DiT weights: this project's NNX tree <-> diffusers' WanTransformer3DModel <-> official layout.

The diffusers table is written out module by module (the DiT's structure is flat and fixed), with
the scanned blocks' stacked parameters addressed by layer index. The official names (the Wan2.1
release, ``WanModel``) are derived from the diffusers ones by the renames diffusers' own
single-file loader applies, in reverse: ``self_attn`` / ``cross_attn``, ``q k v o``, ``ffn.0`` /
``ffn.2``, ``modulation``, ``head.head``, and the cross-attention norm named ``norm3``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from director_jax.convert.param_table import ParamEntry, linear_entries
from director_jax.models.dit import WanDiT, WanDiTConfig


def _shape(model: WanDiT, path: tuple) -> tuple[int, ...]:
    obj: Any = model
    for p in path:
        obj = getattr(obj, p)
    return tuple(obj.get_value().shape)


def diffusers_param_table(model: WanDiT) -> dict[str, ParamEntry]:
    """diffusers key -> ParamEntry for every parameter of ``model`` (which may be abstract)."""
    cfg = model.config
    table: dict[str, ParamEntry] = {}

    kt, kh, kw, cin, dim = _shape(model, ("patch_embedding", "kernel"))
    table["patch_embedding.weight"] = ParamEntry(("patch_embedding", "kernel"), (dim, cin, kt, kh, kw),
                                                 lambda a: a.transpose(4, 3, 0, 1, 2),
                                                 lambda a: a.transpose(2, 3, 4, 1, 0))
    table["patch_embedding.bias"] = ParamEntry(("patch_embedding", "bias"), (dim,))

    def linear(key: str, path: tuple, layer: int | None = None) -> None:
        shape = _shape(model, path + ("kernel",))
        table.update(linear_entries(key, path, shape[1:] if layer is not None else shape, layer))

    ce = ("condition_embedder",)
    linear("condition_embedder.time_embedder.linear_1", ce + ("time_embedder", "linear_1"))
    linear("condition_embedder.time_embedder.linear_2", ce + ("time_embedder", "linear_2"))
    linear("condition_embedder.time_proj", ce + ("time_proj",))
    linear("condition_embedder.text_embedder.linear_1", ce + ("text_embedder", "linear_1"))
    linear("condition_embedder.text_embedder.linear_2", ce + ("text_embedder", "linear_2"))

    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        for attn in ("attn1", "attn2"):
            for proj, torch_name in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                linear(f"{b}.{attn}.{torch_name}", ("blocks", attn, proj), i)
            for norm in ("norm_q", "norm_k"):
                path = ("blocks", attn, norm, "weight")
                table[f"{b}.{attn}.{norm}.weight"] = ParamEntry(path, _shape(model, path)[1:], layer=i)
        if cfg.cross_attn_norm:
            for name in ("weight", "bias"):
                path = ("blocks", "norm2", name)
                table[f"{b}.norm2.{name}"] = ParamEntry(path, _shape(model, path)[1:], layer=i)
        linear(f"{b}.ffn.net.0.proj", ("blocks", "ffn", "proj_in"), i)
        linear(f"{b}.ffn.net.2", ("blocks", "ffn", "proj_out"), i)
        path = ("blocks", "scale_shift_table")
        table[f"{b}.scale_shift_table"] = ParamEntry(path, _shape(model, path)[1:], layer=i)

    linear("proj_out", ("proj_out",))
    table["scale_shift_table"] = ParamEntry(("scale_shift_table",), _shape(model, ("scale_shift_table",)))
    return table


# ------------------------------------------------------------------------------------------------
# The official Wan2.1 layout

_TOP_RENAMES = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
# Within a block, applied in order to ".<rest>." (so names match whole dotted segments).
_BLOCK_RENAMES = (
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."), (".scale_shift_table.", ".modulation."),
)


def to_official_key(key: str) -> str:
    """A diffusers WanTransformer3DModel key -> the official Wan2.1 key."""
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        rest = f".{rest}."
        for old, new in _BLOCK_RENAMES:
            rest = rest.replace(old, new)
        return f"blocks.{index}.{rest[1:-1]}"
    for old, new in _TOP_RENAMES.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key  # patch_embedding.*


def official_key_map(model: WanDiT) -> dict[str, str]:
    """diffusers key -> official key, for every parameter of ``model``."""
    return {key: to_official_key(key) for key in diffusers_param_table(model)}


def looks_official(state: Mapping[str, np.ndarray]) -> bool:
    return any(k.startswith(("head.head.", "time_embedding.", "text_embedding.")) or ".self_attn." in k
               for k in state)


OFFICIAL_PREFIXES = ("model.diffusion_model.",)  # ComfyUI-style single files


def config_from_official(state: Mapping[str, np.ndarray], official: Mapping[str, Any] | None) -> WanDiTConfig:
    """The config of an official-layout checkpoint: from its shapes, heads from its config.json.

    The number of heads is not in any shape. It comes from the official ``config.json``
    (``num_heads``) when there is one; otherwise head_dim 128 is assumed, as in every released
    Wan2.1 T2V model (1.3B: 12 heads of 128, 14B: 40 of 128).
    """
    needed = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight",
              "blocks.0.ffn.0.weight"]
    lacking = [k for k in needed if k not in state]
    if lacking:
        raise ValueError(f"cannot infer the transformer config from official-layout weights lacking {lacking}; "
                         "pass the config explicitly (config= / --config).")
    dim, in_dim, *patch = state["patch_embedding.weight"].shape
    if official and "num_heads" in official:
        heads = int(official["num_heads"])
    elif dim % 128 == 0:
        heads = dim // 128
    else:
        raise ValueError(f"cannot tell the number of heads of a dim-{dim} transformer (not a multiple of 128): "
                         "put the official config.json (with num_heads) beside the weights or pass --config.")
    num_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    eps = float(official.get("eps", 1e-6)) if official else 1e-6
    return WanDiTConfig(
        patch_size=tuple(int(p) for p in patch),
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=int(in_dim),
        out_channels=int(state["head.head.weight"].shape[0]) // int(np.prod(patch)),
        text_dim=int(state["text_embedding.0.weight"].shape[1]),
        freq_dim=int(state["time_embedding.0.weight"].shape[1]),
        ffn_dim=int(state["blocks.0.ffn.0.weight"].shape[0]),
        num_layers=num_layers,
        cross_attn_norm="blocks.0.norm3.weight" in state,
        eps=eps,
    )
