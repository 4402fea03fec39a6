"""LoRA fine-tuning through peft, saved in the diffusers / peft LoRA format.

LoRA (Hu et al. 2021, Eq. 3) trains a low-rank update of each targeted weight, the weight
itself frozen:

    h = W x + (alpha / r) B A x,    A (r, in) ~ N(0, 1/r),  B (out, r) = 0 at the start

so the first step starts from the base model exactly, and only A and B (a few MB) are trained
and saved. peft wraps the targeted nn.Linear layers (`inject_adapter_in_model`); the targets are
the U-Net's attention projections and, with --train-text-encoder, the text encoder's:

    U-Net          to_q, to_k, to_v, to_out.0       (every attn1 / attn2 of every transformer)
    text encoder   q_proj, k_proj, v_proj, out_proj

The result, `pytorch_lora_weights.safetensors`, is what diffusers' training scripts write and
its `load_lora_weights` reads:

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   (r, in)
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   (out, r)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight ...

with the LoRA config (r, lora_alpha, target_modules per model, keys prefixed "unet." /
"text_encoder.") as JSON under "lora_adapter_metadata" in the safetensors header: without it a
reader must assume alpha = r. pipelines/lora.py loads the same file into our pipelines.

Checkpoints of a LoRA run hold only the LoRA tensors (peft's names, adapter "default").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.lora import LORA_WEIGHT_NAME, METADATA_KEY

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TARGETS = {"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS}
ADAPTER = "default"  # peft's adapter name; it is not part of the saved keys


def add_lora(name: str, module: torch.nn.Module, rank: int, alpha: float) -> None:
    """Freeze `module` ("unet" or "text_encoder") and wrap its targets in trainable LoRA layers."""
    from peft import LoraConfig, inject_adapter_in_model

    if name not in TARGETS:
        raise ValueError(f"LoRA for {name!r}: allowed: {', '.join(TARGETS)}")
    if any(getattr(m, "fused", False) for m in module.modules()):
        raise ValueError(f"{name}: call unfuse_qkv() before adding LoRA layers")
    module.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: diffusers' training scripts' choice
        target_modules=list(TARGETS[name]),
    )
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)


def lora_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters, by their names in the (wrapped) module."""
    return {k: p for k, p in module.named_parameters() if ".lora_" in k and p.requires_grad}


def lora_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a wrapped module under peft's names (for checkpoints)."""
    return {k: p.detach() for k, p in lora_parameters(module).items()}


def load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore lora_state(); the names must match the module's LoRA layers exactly."""
    params = lora_parameters(module)
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise ValueError(
            f"LoRA checkpoint does not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]} (was it written with the same --lora-rank and "
            "--train-text-encoder?)"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def saved_lora_weights(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{prefix.module.lora_A.weight: A, ...} in the diffusers / peft file format."""
    tag = f".{ADAPTER}."
    return {
        f"{name}.{k.replace(tag, '.')}": p.detach().float().cpu().contiguous()
        for name, module in modules.items()
        for k, p in lora_parameters(module).items()
    }


def lora_metadata(modules: dict[str, torch.nn.Module], rank: int, alpha: float) -> dict:
    """The LoraConfig fields diffusers rebuilds each model's adapter from, per model prefix."""
    out = {}
    for name in modules:
        out |= {f"{name}.r": rank, f"{name}.lora_alpha": alpha,
                f"{name}.target_modules": sorted(TARGETS[name])}  # fmt: skip
    return out


def save_lora(
    folder: str | os.PathLike, modules: dict[str, torch.nn.Module], rank: int, alpha: float
) -> Path:
    """Write <folder>/pytorch_lora_weights.safetensors (diffusers' load_lora_weights reads it)."""
    path = Path(folder) / LORA_WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(lora_metadata(modules, rank, alpha))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(saved_lora_weights(modules), str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
