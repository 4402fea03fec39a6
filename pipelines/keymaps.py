"""The key table between original single-file checkpoints and diffusers state dicts.

A Stable Diffusion single file (CompVis `model.ckpt`, A1111 `.safetensors`) stores three models
under three prefixes; diffusers stores each model in its own folder with its own names:

| single file                      | diffusers folder   | this table          |
|----------------------------------|--------------------|---------------------|
| `model.diffusion_model.*`        | `unet/`            | `unet_rules(config)`|
| `first_stage_model.*`            | `vae/`             | `vae_rules(config)` |
| `cond_stage_model.transformer.*` | `text_encoder/`    | `CLIP_RULES`        |

SD 2.x keeps its OpenCLIP text tower under `cond_stage_model.model.*`; its conversion is not a
renaming (q/k/v are fused) and lives in `text_encoder/openclip.py`.

The table is a list of `Rule`s, each one module prefix in both namings plus, for ResNet and VAE
attention modules, the renaming of the sub-modules inside it. The U-Net and VAE tables depend on
the architecture (levels, layers per level, which levels attend), so they are built from the
diffusers config dict. Every key must match a rule: an unmatched key is an error, never dropped.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# U-Net ResBlock (openaimodel.py) sub-modules -> diffusers ResnetBlock2D.
UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# VAE ResnetBlock (ldm/modules/diffusionmodules/model.py) -> diffusers ResnetBlock2D.
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}

# VAE AttnBlock -> diffusers Attention. The original uses 1x1 convolutions for q, k, v and the
# output projection, diffusers uses Linear layers: weights are [C, C, 1, 1] <-> [C, C].
VAE_ATTENTION = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
VAE_ATTENTION_CONV1X1 = frozenset({"q", "k", "v", "proj_out"})


@dataclass(frozen=True)
class Rule:
    """One module prefix in both namings, with the renaming of its sub-modules (None: same)."""

    original: str
    diffusers: str
    inner: Mapping[str, str] | None = None
    conv1x1: frozenset[str] = field(default_factory=frozenset)


def _per_level(value: int | list[int] | tuple[int, ...], levels: int, name: str) -> list[int]:
    """An int-or-per-level config entry as one int per level."""
    if isinstance(value, int):
        return [value] * levels
    if len(value) != levels:
        raise ValueError(f"{name} has {len(value)} entries, expected one per level ({levels})")
    return list(value)


def _resnet(original: str, diffusers: str) -> Rule:
    return Rule(original, diffusers, UNET_RESNET)


def unet_rules(config: Mapping) -> list[Rule]:
    """The U-Net table for a diffusers `UNet2DConditionModel` config dict."""
    levels = len(config["block_out_channels"])
    layers = _per_level(config["layers_per_block"], levels, "layers_per_block")
    attends = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    up_attends = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]
    if up_attends != attends[::-1]:
        raise ValueError(
            f"up_block_types {config['up_block_types']} must mirror down_block_types "
            f"{config['down_block_types']}: the single-file layout has no other form"
        )
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(
            f"mid_block_type {config['mid_block_type']!r} has no single-file layout; "
            "allowed: 'UNetMidBlock2DCrossAttn'"
        )
    rules = [
        Rule("time_embed.0.", "time_embedding.linear_1."),
        Rule("time_embed.2.", "time_embedding.linear_2."),
        *_class_embedding_rules(config),
        Rule("input_blocks.0.0.", "conv_in."),
    ]

    # input_blocks: one block per ResBlock (+ its transformer), then one Downsample per level.
    index = 1
    for level in range(levels):
        for j in range(layers[level]):
            down = f"down_blocks.{level}."
            rules.append(_resnet(f"input_blocks.{index}.0.", f"{down}resnets.{j}."))
            if attends[level]:
                rules.append(Rule(f"input_blocks.{index}.1.", f"{down}attentions.{j}."))
            index += 1
        if level < levels - 1:
            rules.append(
                Rule(f"input_blocks.{index}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.")
            )
            index += 1

    rules += [
        _resnet("middle_block.0.", "mid_block.resnets.0."),
        Rule("middle_block.1.", "mid_block.attentions.0."),
        _resnet("middle_block.2.", "mid_block.resnets.1."),
    ]

    # output_blocks: deepest level first, one more ResBlock per level than on the way down;
    # the Upsample sits after the transformer (slot 2) or after the ResBlock (slot 1).
    index = 0
    for up_level in range(levels):
        level = levels - 1 - up_level
        up = f"up_blocks.{up_level}."
        for j in range(layers[level] + 1):
            rules.append(_resnet(f"output_blocks.{index}.0.", f"{up}resnets.{j}."))
            if attends[level]:
                rules.append(Rule(f"output_blocks.{index}.1.", f"{up}attentions.{j}."))
            if j == layers[level] and up_level < levels - 1:
                slot = 2 if attends[level] else 1
                rules.append(Rule(f"output_blocks.{index}.{slot}.conv.", f"{up}upsamplers.0.conv."))
            index += 1

    rules += [Rule("out.0.", "conv_norm_out."), Rule("out.2.", "conv_out.")]
    return rules


def _class_embedding_rules(config: Mapping) -> list[Rule]:
    """`label_emb` <-> `class_embedding`: an nn.Embedding, or the 'projection' MLP."""
    kind = config.get("class_embed_type")
    if kind == "projection":
        return [
            Rule("label_emb.0.0.", "class_embedding.linear_1."),
            Rule("label_emb.0.2.", "class_embedding.linear_2."),
        ]
    if kind is not None:
        raise ValueError(
            f"class_embed_type {kind!r} has no single-file layout; allowed: None, 'projection'"
        )
    if config.get("num_class_embeds") is not None:
        return [Rule("label_emb.", "class_embedding.")]
    return []


def vae_rules(config: Mapping) -> list[Rule]:
    """The VAE table for a diffusers `AutoencoderKL` config dict."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    rules = []
    for coder in ("encoder", "decoder"):
        rules += [
            Rule(f"{coder}.conv_in.", f"{coder}.conv_in."),
            Rule(f"{coder}.mid.block_1.", f"{coder}.mid_block.resnets.0.", VAE_RESNET),
            Rule(f"{coder}.mid.block_2.", f"{coder}.mid_block.resnets.1.", VAE_RESNET),
            Rule(f"{coder}.norm_out.", f"{coder}.conv_norm_out."),
            Rule(f"{coder}.conv_out.", f"{coder}.conv_out."),
        ]
        if config.get("mid_block_add_attention", True):
            mid_attention = f"{coder}.mid_block.attentions.0."
            rules.append(
                Rule(f"{coder}.mid.attn_1.", mid_attention, VAE_ATTENTION, VAE_ATTENTION_CONV1X1)
            )
    for level in range(levels):
        down = f"encoder.down_blocks.{level}."
        for j in range(layers):
            rules.append(
                Rule(f"encoder.down.{level}.block.{j}.", f"{down}resnets.{j}.", VAE_RESNET)
            )
        if level < levels - 1:
            rules.append(
                Rule(f"encoder.down.{level}.downsample.conv.", f"{down}downsamplers.0.conv.")
            )
    # The original decoder numbers its levels from the bottom up (up.0 is the full-resolution
    # level, run last); diffusers numbers them in execution order.
    for up_level in range(levels):
        level = levels - 1 - up_level
        up = f"decoder.up_blocks.{up_level}."
        for j in range(layers + 1):
            rules.append(Rule(f"decoder.up.{level}.block.{j}.", f"{up}resnets.{j}.", VAE_RESNET))
        if up_level < levels - 1:
            rules.append(Rule(f"decoder.up.{level}.upsample.conv.", f"{up}upsamplers.0.conv."))
    if config.get("use_quant_conv", True):
        rules.append(Rule("quant_conv.", "quant_conv."))
    if config.get("use_post_quant_conv", True):
        rules.append(Rule("post_quant_conv.", "post_quant_conv."))
    return rules


# SD 1.x wraps a transformers CLIPTextModel as `cond_stage_model.transformer`. Since transformers
# 5.6 CLIPTextModel has no `text_model.` level in its own state dict; the diffusers side here
# follows the installed CLIPTextModel (no prefix).
CLIP_RULES = [Rule("transformer.text_model.", "")]


def convert_keys(
    state_dict: Mapping[str, torch.Tensor], rules: list[Rule], to: str, component: str
) -> dict[str, torch.Tensor]:
    """Rename every key of one component by `rules`, toward `to` ("diffusers" or "original")."""
    if to not in ("diffusers", "original"):
        raise ValueError(f"to must be 'diffusers' or 'original', got {to!r}")
    forward = to == "diffusers"
    table = {(rule.original if forward else rule.diffusers): rule for rule in rules}
    out, unknown = {}, []
    for key, tensor in state_dict.items():
        rule = _longest_prefix(key, table)
        renamed = None if rule is None else _rename(key, rule, forward)
        if renamed is None:
            unknown.append(key)
            continue
        new_key, original_module = renamed
        if original_module in rule.conv1x1 and key.endswith(".weight"):
            tensor = _conv1x1_to_linear(tensor) if forward else _linear_to_conv1x1(tensor)
        out[new_key] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(
            f"{component}: {len(unknown)} key(s) have no place in the {to} layout of this "
            f"architecture: {shown}"
        )
    return out


def _longest_prefix(key: str, table: Mapping[str, Rule]) -> Rule | None:
    """The rule whose prefix (ending in '.', or empty) is the longest start of `key`."""
    end = key.rfind(".")
    while end >= 0:
        rule = table.get(key[: end + 1])
        if rule is not None:
            return rule
        end = key.rfind(".", 0, end)
    return table.get("")


def _rename(key: str, rule: Rule, forward: bool) -> tuple[str, str] | None:
    """(new key, sub-module in original naming), or None if the sub-module is unknown."""
    source, target = (rule.original, rule.diffusers) if forward else (rule.diffusers, rule.original)
    rest = key[len(source) :]
    if rule.inner is None:
        return target + rest, ""
    module, _, param = rest.rpartition(".")
    names = rule.inner if forward else {new: old for old, new in rule.inner.items()}
    if module not in names:
        return None
    original_module = module if forward else names[module]
    return f"{target}{names[module]}.{param}", original_module


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 1, 1] -> [C_out, C_in]; already-linear weights pass as they are."""
    if weight.ndim == 2:
        return weight
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 convolution weight, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], weight.shape[1])


def _linear_to_conv1x1(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in] -> [C_out, C_in, 1, 1]."""
    if weight.ndim != 2:
        raise ValueError(f"expected a linear weight, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], weight.shape[1], 1, 1)
