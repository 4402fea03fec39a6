"""OpenCLIP text tower (SD 2.x) through open_clip, and its conversion to transformers' CLIP.

How SD 2.x picks its layer, and how we represent it:
- The original SD 2.x text encoder is OpenCLIP ViT-H/14's text tower (24 residual blocks). Its
  context is ln_final applied to the output of the penultimate block: the last block runs never.
- diffusers SD 2.x folders hold a transformers CLIPTextModel with num_hidden_layers=23: the
  unused last block is dropped, so last_hidden_state (after final_layer_norm) is SD 2.x's
  context and clip_skip=None is right for it. We follow that convention:
  `open_clip_to_clip_text` drops the last block by default (drop_last_layer=True), and
  `clip_text_to_open_clip` converts the blocks it is given (23 for such a folder; an original
  checkpoint written from it has no resblocks.23, which SD 2.x never uses).
- `OpenClipTextEncoder` keeps open_clip's full tower and skips `layers_skipped` (default 1)
  final blocks at run time; clip_skip=k skips k more. So for every clip_skip it gives the same
  context as the converted 23-layer ClipTextEncoder. `pooled` is ln_final of the state after
  the layers kept by default, at the first EOS token (no text_projection), which is what the
  converted CLIPTextModel's pooler_output is.

Key mapping (open_clip -> transformers CLIPTextModel, per block i):
    token_embedding.weight                  embeddings.token_embedding.weight
    positional_embedding                    embeddings.position_embedding.weight
    transformer.resblocks.i.ln_1 / ln_2     encoder.layers.i.layer_norm1 / layer_norm2
    transformer.resblocks.i.attn.in_proj_*  encoder.layers.i.self_attn.{q,k,v}_proj.* (split in 3)
    transformer.resblocks.i.attn.out_proj   encoder.layers.i.self_attn.out_proj
    transformer.resblocks.i.mlp.c_fc/c_proj encoder.layers.i.mlp.fc1 / fc2
    ln_final                                final_layer_norm
transformers 4.x nests all of these under `text_model.`; the prefix follows the installed
version, and the reverse accepts both. text_projection and logit_scale have no place in a
CLIPTextModel and are dropped (SD 2.x does not use them).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .base import TextEncoder
from .clip import LEGACY_PREFIX, check_clip_skip
from .tokenizer import offline_clip_tokenizer

_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
# Per-block names: open_clip -> transformers (the attention in_proj is split separately).
_BLOCK_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_NAMES = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_DROPPED = ("text_projection", "logit_scale", "attn_mask")
_QKV = ("q_proj", "k_proj", "v_proj")


def clip_text_key_prefix() -> str:
    """The key prefix of the installed transformers' CLIPTextModel ("" in 5.x)."""
    import transformers

    return LEGACY_PREFIX if int(transformers.__version__.split(".")[0]) < 5 else ""


def open_clip_to_clip_text(
    state_dict: dict[str, torch.Tensor],
    *,
    drop_last_layer: bool = True,
    num_attention_heads: int | None = None,
    hidden_act: str = "gelu",
) -> tuple[dict[str, torch.Tensor], dict]:
    """open_clip text tower weights -> (CLIPTextModel state dict, CLIPTextConfig kwargs).

    state_dict: keys as in open_clip (`token_embedding.weight`, `transformer.resblocks.0...`),
    i.e. an SD 2.x checkpoint's `cond_stage_model.model.*` with that prefix removed; `visual.*`
    keys of a full open_clip checkpoint are ignored. drop_last_layer: diffusers' SD 2.x
    convention (see the module docstring). num_attention_heads: not stored in the weights;
    open_clip's configs use width // 64 (16 for ViT-H), the default. hidden_act: "gelu" for
    OpenCLIP towers, "quick_gelu" for OpenAI's.
    """
    if "token_embedding.weight" not in state_dict:
        raise ValueError(
            "state_dict has no 'token_embedding.weight': pass open_clip text weights with the "
            "'cond_stage_model.model.' prefix removed"
        )
    config = _infer_clip_config(state_dict, num_attention_heads, hidden_act)
    n_blocks = config["num_hidden_layers"]
    if drop_last_layer:
        if n_blocks < 2:
            raise ValueError("drop_last_layer needs at least 2 blocks, the tower has 1")
        config["num_hidden_layers"] = n_blocks - 1
    prefix = clip_text_key_prefix()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("visual.") or key in _DROPPED:
            continue
        if key in _TOP_NAMES:
            out[prefix + _TOP_NAMES[key]] = value
            continue
        block = _BLOCK.fullmatch(key)
        if block is None:
            raise ValueError(f"unexpected open_clip text key {key!r}")
        index, name = int(block[1]), block[2]
        if index >= config["num_hidden_layers"]:
            continue  # the dropped last block
        out.update(_convert_block_param(name, value, f"{prefix}encoder.layers.{index}."))
    return out, config


def _convert_block_param(name: str, value: torch.Tensor, target: str) -> dict[str, torch.Tensor]:
    """One open_clip residual-block parameter -> its CLIPEncoderLayer parameter(s)."""
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rsplit("_", 1)[1]  # weight | bias
        q, k, v = value.chunk(3, dim=0)
        return {f"{target}self_attn.{proj}.{kind}": t.clone() for proj, t in zip(_QKV, (q, k, v))}
    module, _, kind = name.rpartition(".")
    if module not in _BLOCK_NAMES:
        raise ValueError(f"open_clip block parameter {name!r} has no CLIPTextModel equivalent")
    return {f"{target}{_BLOCK_NAMES[module]}.{kind}": value}


def _infer_clip_config(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int | None, hidden_act: str
) -> dict:
    """CLIPTextConfig kwargs read from the weight shapes."""
    vocab_size, width = state_dict["token_embedding.weight"].shape
    blocks = {int(m[1]) for key in state_dict if (m := _BLOCK.fullmatch(key))}
    if blocks != set(range(len(blocks))) or not blocks:
        raise ValueError(f"open_clip blocks must be numbered 0..n-1, found {sorted(blocks)}")
    heads = num_attention_heads if num_attention_heads is not None else width // 64
    if heads < 1 or width % heads:
        raise ValueError(f"num_attention_heads must divide the width {width}, got {heads}")
    config = dict(
        vocab_size=int(vocab_size),
        hidden_size=int(width),
        intermediate_size=int(state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        max_position_embeddings=int(state_dict["positional_embedding"].shape[0]),
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )
    if "text_projection" in state_dict:
        config["projection_dim"] = int(state_dict["text_projection"].shape[1])
    return config


def clip_text_to_open_clip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel weights -> open_clip text tower keys (the reverse mapping).

    Keys with or without the `text_model.` prefix are accepted. The result has no
    text_projection or logit_scale (a CLIPTextModel has neither).
    """
    top = {v: k for k, v in _TOP_NAMES.items()}
    names = {v: k for k, v in _BLOCK_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for full_key, value in state_dict.items():
        key = full_key.removeprefix(LEGACY_PREFIX)
        if key == "embeddings.position_ids":
            continue
        if key in top:
            out[top[key]] = value
            continue
        layer = _LAYER.fullmatch(key)
        if layer is None:
            raise ValueError(f"unexpected CLIPTextModel key {full_key!r}")
        index, name = int(layer[1]), layer[2]
        module, _, kind = name.rpartition(".")
        if module.startswith("self_attn.") and module.split(".")[1] in _QKV:
            qkv.setdefault((index, kind), {})[module.split(".")[1]] = value
        elif module in names:
            out[f"transformer.resblocks.{index}.{names[module]}.{kind}"] = value
        else:
            raise ValueError(f"CLIPTextModel parameter {full_key!r} has no open_clip equivalent")
    for (index, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"layer {index} {kind}: needs q_proj, k_proj and v_proj")
        fused = torch.cat([parts[p] for p in _QKV], dim=0)
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = fused
    return out


class OpenClipTextEncoder(TextEncoder):
    """open_clip text tower with SD 2.x's layer choice: ln_final(penultimate block)."""

    def __init__(self, model: nn.Module, tokenizer=None, layers_skipped: int = 1, pad_id: int = 0):
        """model: an open_clip TextTransformer (or CLIP); pad_id: 0 ("!"), as open_clip pads."""
        n_blocks = len(model.transformer.resblocks)
        if not 0 <= layers_skipped < n_blocks:
            raise ValueError(f"layers_skipped must be in [0, {n_blocks - 1}], got {layers_skipped}")
        context_length = model.positional_embedding.shape[0]
        if tokenizer is None:
            # Padding is framed with pad_id below, so the tokenizer keeps "<|endoftext|>" as its
            # pad token: one whose pad token is "!" would read a "!" in the prompt as padding
            # (id 0) rather than as BPE text (id 256), unlike open_clip.tokenize.
            tokenizer = offline_clip_tokenizer(context_length)
        self.model = model
        self.tokenizer = tokenizer
        self.layers_skipped = layers_skipped
        self.max_length = min(tokenizer.model_max_length, context_length)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = pad_id

    @property
    def num_layers(self) -> int:
        """Blocks used by default (the converted CLIPTextModel's num_hidden_layers)."""
        return len(self.model.transformer.resblocks) - self.layers_skipped

    @classmethod
    def from_config(
        cls,
        config: str | dict,
        checkpoint: str | Path | None = None,
        *,
        layers_skipped: int = 1,
    ) -> OpenClipTextEncoder:
        """Build the text tower of an open_clip model config; random init unless `checkpoint`.

        config: an open_clip model name ("ViT-H-14") or a dict with "text_cfg" (CLIPTextCfg
        fields), "embed_dim" and optionally "quick_gelu", as in open_clip's model configs.
        checkpoint: a local open_clip (or SD 2.x) checkpoint, .safetensors or a torch file.
        """
        import open_clip
        from open_clip.model import _build_text_tower  # open_clip's one text-tower builder

        if isinstance(config, str):
            name, config = config, open_clip.get_model_config(config)
            if config is None:
                raise ValueError(f"config {name!r} is not an open_clip model name")
        if "text_cfg" not in config or "embed_dim" not in config:
            raise ValueError("config must hold 'text_cfg' and 'embed_dim'")
        tower = _build_text_tower(
            config["embed_dim"], config["text_cfg"], quick_gelu=config.get("quick_gelu", False)
        )
        if checkpoint is not None:
            load_text_tower(tower, checkpoint)
        return cls(tower.eval(), layers_skipped=layers_skipped)

    def forward_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, clip_skip: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the blocks the skips keep (as SD 2.x's FrozenOpenCLIPEmbedder), then ln_final."""
        skip = check_clip_skip(clip_skip, self.num_layers)
        tower = self.model
        x = tower.token_embedding(ids).to(self.dtype)
        x = x + tower.positional_embedding[: ids.shape[1]].to(self.dtype)
        attn_mask = tower.attn_mask
        if attn_mask is not None:  # None for a bidirectional tower (no_causal_mask)
            attn_mask = attn_mask[: ids.shape[1], : ids.shape[1]]
        batch_first = getattr(tower.transformer, "batch_first", False)
        x = x if batch_first else x.transpose(0, 1)  # open_clip < 2.23 works in (L, N, D)
        context = None
        for i, block in enumerate(tower.transformer.resblocks[: self.num_layers]):
            if i == self.num_layers - skip:
                context = x
            x = block(x, attn_mask=attn_mask)
        context = x if context is None else context
        if not batch_first:
            x, context = x.transpose(0, 1), context.transpose(0, 1)
        eos = (ids == self.eos_id).int().argmax(dim=-1)
        pooled = tower.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), eos]
        return tower.ln_final(context), pooled


def load_text_tower(tower: nn.Module, checkpoint: str | Path) -> None:
    """Load open_clip text weights into `tower` (full CLIP or SD 2.x checkpoints accepted)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    for prefix in ("module.", "cond_stage_model.model."):
        if any(key.startswith(prefix) for key in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("visual.") and k != "logit_scale"}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    # A checkpoint converted back from a CLIPTextModel has no text_projection; SD 2.x needs none.
    missing = [k for k in missing if k != "text_projection"]
    if missing or unexpected:
        raise ValueError(f"{path}: missing text keys {missing}, unexpected keys {unexpected}")
