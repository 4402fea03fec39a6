"""Original single-file checkpoints (CompVis `model.ckpt`, A1111 `.safetensors`) <-> diffusers.

A single file holds the whole LatentDiffusion module's state dict: the U-Net under
`model.diffusion_model.`, the KL autoencoder under `first_stage_model.`, the text encoder under
`cond_stage_model.` (CLIP for SD 1.x, OpenCLIP for SD 2.x), plus training leftovers (EMA copies
`model_ema.*`, schedule buffers such as `alphas_cumprod`), sometimes nested under `state_dict`.
The renaming table is `pipelines/keymaps.py`; the architecture is read from tensor shapes.

Loading never runs pickle code: `.safetensors` through safetensors, everything else through
`torch.load(weights_only=True)`.
"""

import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines.keymaps import CLIP_RULES, convert_keys, unet_rules, vae_rules

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_ENCODER_FORMATS = ("clip", "open_clip")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LDM_SCALING_FACTOR = 0.18215  # SD 1.x and 2.x latents are scaled by this before diffusion
CLIP_HEAD_DIM = 64  # every CLIP / OpenCLIP text tower and SD 2.x U-Net uses 64-wide heads
SD1_HEADS = 8  # SD 1.x fixes the number of heads instead (diffusers calls it attention_head_dim)


def split_original(state_dict: Mapping, *, use_ema: bool = False) -> dict[str, dict]:
    """Single-file state dict -> {"unet" | "vae" | "text_encoder": state dict without its prefix}.

    Top-level buffers (`alphas_cumprod`, `betas`, ...), EMA copies and the autoencoder's training
    loss are ignored; any other unknown prefix is an error. `use_ema=True` takes the U-Net from the
    EMA copies (`model_ema.diffusion_model<flattened name>`).
    """
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    parts = {name: {} for name in PREFIXES}
    unknown = []
    for key, value in state_dict.items():
        name = next((n for n, prefix in PREFIXES.items() if key.startswith(prefix)), None)
        if name is not None:
            parts[name][key[len(PREFIXES[name]) :]] = value
        elif "." in key and not key.startswith("model_ema."):
            unknown.append(key)
    if unknown:
        hint = (
            " (SDXL checkpoints are not supported)" if unknown[0].startswith("conditioner.") else ""
        )
        raise ValueError(
            f"state_dict: unknown keys {unknown[:5]}{hint}; expected the prefixes "
            f"{', '.join(PREFIXES.values())}"
        )
    parts["vae"] = {k: v for k, v in parts["vae"].items() if not k.startswith("loss.")}
    if use_ema:
        parts["unet"] = _ema_weights(state_dict, parts["unet"])
    parts = {name: part for name, part in parts.items() if part}
    if not parts:
        raise ValueError(
            f"state_dict: no Stable Diffusion weights (none of {list(PREFIXES.values())})"
        )
    return parts


def _ema_weights(state_dict: Mapping, unet: dict) -> dict:
    """The U-Net's EMA copies; LitEma names them by the module path with the dots removed."""
    ema = {}
    for key in unet:
        ema_key = "model_ema.diffusion_model" + key.replace(".", "")
        if ema_key not in state_dict:
            raise ValueError(f"use_ema=True, but the file has no EMA weights ({ema_key} missing)")
        ema[key] = state_dict[ema_key]
    return ema


def original_to_diffusers(
    state_dict: Mapping, *, use_ema: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """Single-file state dict -> {"unet": ..., "vae": ..., "text_encoder": ...} diffusers dicts."""
    parts = split_original(state_dict, use_ema=use_ema)
    out = {}
    if "unet" in parts:
        rules = unet_rules(_unet_architecture(parts["unet"]))
        out["unet"] = convert_keys(parts["unet"], rules, "diffusers", "unet")
    if "vae" in parts:
        rules = vae_rules(_vae_config(parts["vae"]))
        out["vae"] = convert_keys(parts["vae"], rules, "diffusers", "vae")
    if "text_encoder" in parts:
        out["text_encoder"] = _text_to_diffusers(parts["text_encoder"])[0]
    return out


def diffusers_to_original(
    components: Mapping[str, Mapping[str, torch.Tensor]],
    unet_config: Mapping | None = None,
    vae_config: Mapping | None = None,
    *,
    text_encoder_format: str | None = None,
) -> dict[str, torch.Tensor]:
    """Diffusers state dicts -> one single-file state dict (what A1111 / ComfyUI load).

    Args:
        components: {"unet", "vae", "text_encoder"} -> diffusers state dict (any subset).
        unet_config, vae_config: the diffusers config dicts of those components.
        text_encoder_format: "clip" (SD 1.x) or "open_clip" (SD 2.x); None: "open_clip" when the
            U-Net uses linear projections (as SD 2.x does), else "clip".
    """
    unknown = set(components) - set(PREFIXES)
    if unknown:
        raise ValueError(f"components: unknown {sorted(unknown)}; allowed: {list(PREFIXES)}")
    out = {}
    for name, config, rules_for in (
        ("unet", unet_config, unet_rules),
        ("vae", vae_config, vae_rules),
    ):
        if name not in components:
            continue
        if config is None:
            raise ValueError(f"{name}_config is required to convert the {name}")
        converted = convert_keys(components[name], rules_for(config), "original", name)
        out.update({PREFIXES[name] + k: v for k, v in converted.items()})
    if "text_encoder" in components:
        if text_encoder_format is None:
            linear = bool(unet_config and unet_config.get("use_linear_projection", False))
            text_encoder_format = "open_clip" if linear else "clip"
        original = _text_to_original(components["text_encoder"], text_encoder_format)
        out.update({PREFIXES["text_encoder"] + k: v for k, v in original.items()})
    return out


def _strip_text_model(state_dict: Mapping) -> dict:
    """Drop the `text_model.` level that CLIPTextModel had before transformers 5.6."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _text_to_diffusers(text: Mapping) -> tuple[dict, dict]:
    """`cond_stage_model.*` (prefix removed) -> (CLIPTextModel state dict, its config kwargs)."""
    if _text_format(text) == "open_clip":
        from text_encoder.openclip import open_clip_to_clip_text

        state, config = open_clip_to_clip_text({k[len("model.") :]: v for k, v in text.items()})
        return _strip_text_model(state), dict(config)
    normalized = {}
    for key, value in text.items():
        # Some early SD 1.x files lack the `text_model.` level inside the transformer.
        if not key.startswith("transformer.text_model."):
            key = "transformer.text_model." + key[len("transformer.") :]
        # position_ids is a non-persistent buffer (an arange) in current transformers.
        if key != "transformer.text_model.embeddings.position_ids":
            normalized[key] = value
    state = convert_keys(normalized, CLIP_RULES, "diffusers", "text_encoder")
    return state, _clip_config(state)


def _text_to_original(text: Mapping, text_encoder_format: str) -> dict:
    """A CLIPTextModel state dict -> `cond_stage_model.*` keys (prefix removed)."""
    text = _strip_text_model(text)
    if text_encoder_format == "clip":
        return convert_keys(text, CLIP_RULES, "original", "text_encoder")
    if text_encoder_format == "open_clip":
        from text_encoder.openclip import clip_text_to_open_clip

        tower = clip_text_to_open_clip(text)
        tower.update(_identity_block(tower))
        return {"model." + k: v for k, v in tower.items()}
    raise ValueError(
        f"text_encoder_format must be one of {TEXT_ENCODER_FORMATS}, got {text_encoder_format!r}"
    )


def _identity_block(tower: Mapping) -> dict:
    """An all-zero last OpenCLIP block: an exact identity (zero LayerNorm gains zero each branch).

    SD 2.x files hold the whole OpenCLIP tower, whose last block SD 2.x never runs and diffusers
    (and `open_clip_to_clip_text`) drop on reading. Writing it back keeps the block count of the
    format, so that reading the written file gives back the same layers.
    """
    blocks = {int(key.split(".")[2]) for key in tower if key.startswith("transformer.resblocks.")}
    last = f"transformer.resblocks.{max(blocks)}."
    new = f"transformer.resblocks.{max(blocks) + 1}."
    return {
        new + k[len(last) :]: torch.zeros_like(v) for k, v in tower.items() if k.startswith(last)
    }


def _text_format(text: Mapping) -> str:
    """'clip' (SD 1.x `transformer.*`) or 'open_clip' (SD 2.x `model.*`)."""
    formats = {"transformer": "clip", "model": "open_clip"}
    found = {formats.get(key.split(".", 1)[0]) for key in text}
    if len(found) != 1 or None in found:
        raise ValueError(
            "cond_stage_model: expected either cond_stage_model.transformer.* (CLIP) or "
            f"cond_stage_model.model.* (OpenCLIP) keys, got e.g. {sorted(text)[:3]}"
        )
    return found.pop()


def _clip_config(state: Mapping) -> dict:
    """CLIPTextConfig kwargs read from a CLIPTextModel state dict's shapes."""
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    layers = {key.split(".")[2] for key in state if key.startswith("encoder.layers.")}
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM),
        "max_position_embeddings": state["embeddings.position_embedding.weight"].shape[0],
        "hidden_act": "quick_gelu",  # OpenAI CLIP ViT-L/14, the SD 1.x text encoder
    }


def infer_configs(state_dict: Mapping, prediction_type: str = "epsilon") -> dict:
    """Diffusers config dicts ("unet", "vae", "text_encoder") and the model family, from shapes.

    A single file does not say whether its U-Net predicts eps or v (SD 2.x 768-v): the caller
    passes `prediction_type`. Returns also "family" ("sd1", "sd2", with "-inpaint" for 9 input
    channels) and "text_encoder_format" ("clip" or "open_clip") when a text encoder is present.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    parts = split_original(state_dict)
    out: dict = {"prediction_type": prediction_type}
    if "text_encoder" in parts:
        out["text_encoder_format"] = _text_format(parts["text_encoder"])
        out["text_encoder"] = _text_to_diffusers(parts["text_encoder"])[1]
    unet = _unet_architecture(parts["unet"]) if "unet" in parts else None
    if "text_encoder_format" in out:
        family = "sd2" if out["text_encoder_format"] == "open_clip" else "sd1"
    elif unet is not None:
        family = "sd2" if unet["use_linear_projection"] else "sd1"
    else:
        family = "sd1"
    if unet is not None:
        unet.update(_family_unet_fields(unet, family, prediction_type))
        in_channels = unet["in_channels"]
        family += {4: "", 9: "-inpaint"}.get(in_channels, f"-{in_channels}ch")
        out["unet"] = unet
    if "vae" in parts:
        vae = _vae_config(parts["vae"])
        latent_size = unet["sample_size"] if unet is not None else 64
        vae["sample_size"] = latent_size * 2 ** (len(vae["block_out_channels"]) - 1)
        out["vae"] = vae
    out["family"] = family
    return out


def _family_unet_fields(unet: dict, family: str, prediction_type: str) -> dict:
    """The U-Net settings no tensor shape shows, as the SD 1.x / 2.x releases set them."""
    if family == "sd1":
        return {"attention_head_dim": SD1_HEADS, "sample_size": 64, "upcast_attention": False}
    channels = unet["block_out_channels"]
    if any(c % CLIP_HEAD_DIM for c in channels):
        raise ValueError(
            f"an SD 2.x U-Net has {CLIP_HEAD_DIM}-wide heads, but block_out_channels {channels} "
            f"are not multiples of {CLIP_HEAD_DIM}"
        )
    # diffusers' SD 2.x configs name the per-level head *counts* attention_head_dim.
    v_model = prediction_type == "v_prediction"
    return {
        "attention_head_dim": [c // CLIP_HEAD_DIM for c in channels],
        "sample_size": 96 if v_model else 64,  # 768-v was trained at 768 px, the base at 512 px
        "upcast_attention": v_model,  # SD 2.1-v overflows in fp16 attention without it
    }


def _unet_architecture(unet: Mapping) -> dict:
    """The U-Net config entries that tensor shapes determine (see unet_rules for the layout)."""
    # "input_blocks.4.1", "middle_block.1": which blocks exist
    blocks = {".".join(key.split(".")[:n]) for key in unet for n in (2, 3)}
    count = len({key.split(".")[1] for key in unet if key.startswith("input_blocks.")})
    layers, channels, attends, depths = [], [], [], []
    level_layers, level_depth = 0, 0
    for index in range(1, count + 1):
        last = index == count
        if not last and f"input_blocks.{index}.0.op.weight" not in unet:
            level_layers += 1
            channels_now = unet[f"input_blocks.{index}.0.out_layers.3.weight"].shape[0]
            if f"input_blocks.{index}.1" in blocks:
                level_depth = _transformer_depth(unet, f"input_blocks.{index}.1.")
            continue
        layers.append(level_layers)
        channels.append(channels_now)
        attends.append(level_depth > 0)
        depths.append(max(level_depth, 1))
        level_layers, level_depth = 0, 0
    if "middle_block.1" not in blocks:
        raise ValueError("unet: no middle_block.1 (cross-attention): not a Stable Diffusion U-Net")
    depths_value = depths[0] if len(set(depths)) == 1 else depths
    config = {
        "in_channels": unet["input_blocks.0.0.weight"].shape[1],
        "out_channels": unet["out.2.weight"].shape[0],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": unet["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[
            1
        ],
        "transformer_layers_per_block": depths_value,
        "use_linear_projection": unet["middle_block.1.proj_in.weight"].ndim == 2,
    }
    config.update(_class_embedding_config(unet))
    return config


def _transformer_depth(unet: Mapping, prefix: str) -> int:
    """How many BasicTransformerBlocks the SpatialTransformer at `prefix` holds."""
    inner = prefix + "transformer_blocks."
    return len({key[len(inner) :].split(".")[0] for key in unet if key.startswith(inner)})


def _class_embedding_config(unet: Mapping) -> dict:
    """label_emb: an nn.Embedding (num_class_embeds) or the 'projection' MLP."""
    if "label_emb.weight" in unet:
        return {"num_class_embeds": unet["label_emb.weight"].shape[0]}
    if "label_emb.0.0.weight" in unet:
        dim = unet["label_emb.0.0.weight"].shape[1]
        return {"class_embed_type": "projection", "projection_class_embeddings_input_dim": dim}
    return {}


def _vae_config(vae: Mapping) -> dict:
    """AutoencoderKL config entries read from the original VAE's shapes."""
    levels = len({key.split(".")[2] for key in vae if key.startswith("encoder.down.")})
    layers = len({key.split(".")[4] for key in vae if key.startswith("encoder.down.0.block.")})
    channels = [vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    return {
        "in_channels": vae["encoder.conv_in.weight"].shape[1],
        "out_channels": vae["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": vae["decoder.conv_in.weight"].shape[1],
        "scaling_factor": LDM_SCALING_FACTOR,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
        "use_quant_conv": "quant_conv.weight" in vae,
        "use_post_quant_conv": "post_quant_conv.weight" in vae,
    }


class _IgnoredObject:
    """Stands in for training-time objects pickled beside the weights; keeps none of their state."""

    def __setstate__(self, state: object) -> None:
        pass


# PyTorch Lightning saved its checkpoint callback into some original SD `.ckpt` files. Allowing
# this one name maps it to a class that does nothing; anything else that is not plain data
# (functions, other classes) is still refused by weights_only.
_PLACEHOLDER_GLOBALS = [
    (_IgnoredObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or .ckpt/.pt/.pth/.bin file, never running pickle code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        loaded = _load_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        loaded = _load_pickle(path)
    else:
        raise ValueError(
            f"{path}: unknown suffix {suffix!r}; allowed: .safetensors, {PICKLE_SUFFIXES}"
        )
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors")
    return tensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(
            f"{path}: not a valid safetensors file, corrupt or truncated ({err})"
        ) from err


def _load_pickle(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_PLACEHOLDER_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"{path}: corrupt or truncated checkpoint ({err})") from err
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(err))
        detail = found.group(1) if found else "a non-tensor object"
        # `from None`: torch's message suggests weights_only=False, which is what we refuse.
        raise ValueError(
            f"{path}: refused to load: the pickle would run code ({detail}). Only tensors and "
            "plain containers are loaded; convert the file to .safetensors with a tool you trust."
        ) from None
    except Exception as err:  # a damaged pickle or zip fails with arbitrary exception types
        raise ValueError(
            f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {err})"
        ) from err


def save_single_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write a single-file state dict as .safetensors, atomically (temp file, then os.replace)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end with .safetensors, got {path.name!r}")
    tensors, seen = {}, set()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        # safetensors refuses tensors that share memory (views, tied weights): give them their own.
        if storage.data_ptr() in seen or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
