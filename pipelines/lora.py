"""LoRA weights in our pipelines: load (merged into the weights), rescale, stack, unload.

A LoRA (Hu et al. 2021, Eq. 3) changes a weight by a low-rank product, here merged in place:

    W  =  W0 + sum_i  s_i * c_i * B_i A_i          c_i = alpha_i / r_i  (alpha_i / sqrt(r_i)
                                                   for rsLoRA), s_i the scale the user asks for

A_i (r, in, *kernel) is the "down" factor, B_i (out, r, *1) the "up" one. W0 of every weight a
LoRA touches is copied (to the CPU) the first time, and W is recomputed from W0 and the LoRAs
still loaded whenever one is loaded, rescaled or unloaded, so unloading the last one restores
W0 bitwise. Merging costs nothing per step; the images equal diffusers' unmerged
W x + s c B (A x) to float rounding. peft is not used (nor imported) here.

File formats, told apart by their keys:

    diffusers / peft   unet.<module>.lora_A.weight, unet.<module>.lora_B.weight,
                       text_encoder.<module>.lora_A.weight ...; alpha per model from the
                       header's "lora_adapter_metadata" JSON ("unet.lora_alpha", "unet.r",
                       "unet.alpha_pattern", "unet.use_rslora"), else alpha = r
    diffusers (older)  unet.<module>.lora.down.weight / lora.up.weight, lora_linear_layer.*, and
                       attention processors' ...attn1.processor.to_q_lora.down.weight (alpha = r)
    kohya / A1111      lora_unet_<module, dots as underscores>.lora_down.weight / lora_up.weight
                       / .alpha (a 0-d tensor), and lora_te_<module> for the text encoder

Modules are found by name in the model itself (kohya's names are the module path with "." -> "_",
so the model resolves them unambiguously), including the to_q / to_k / to_v rows of an
attention whose projections are fused (ldm.attention.Attention.fuse_qkv). A key that names no
module, an unsupported kind (DoRA, LoHa, LoKr) or mismatched shapes raises ValueError.

State lives with the modules (a weak map from each model to its merged LoRAs), so pipelines
that share components (from_pipeline) see the same LoRAs.
"""

from __future__ import annotations

import json
import math
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.attention import QKV

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
MODELS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# key endings -> which tensor of a module's LoRA they hold
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",  # attention processors: ...attn1.processor.to_q_lora.down.weight
    "_lora.up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
UNSUPPORTED = ("dora_scale", "lora_magnitude_vector", "hada_", "lokr_", ".diff", "lora_B.bias")


# ==== reading LoRA files ====


@dataclass
class LoraFactor:
    """One module's low-rank update: delta W = scale * up @ down (reshaped to W's shape)."""

    down: torch.Tensor  # A: (r, in, *kernel)
    up: torch.Tensor  # B: (out, r, *1)
    scale: float  # alpha / r

    def delta(self, shape: torch.Size, device=None) -> torch.Tensor:
        """scale * B A as a float32 tensor of `shape` (Hu et al. 2021, Eq. 3)."""
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        product = up.flatten(1) @ down.flatten(1)
        if product.numel() != math.prod(shape):
            raise ValueError(
                f"LoRA factors up {tuple(self.up.shape)} and down {tuple(self.down.shape)} do "
                f"not fit a weight of shape {tuple(shape)}"
            )
        return self.scale * product.reshape(shape)


def read_lora_file(
    source: str | os.PathLike, weight_name: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, lora metadata) of a LoRA .safetensors file, a folder holding one, or a Hub id."""
    path = _lora_path(source, weight_name)
    if path.suffix != ".safetensors":
        from pipelines.single_file import load_state_dict_file

        return load_state_dict_file(path), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from err
    raw = header.get(METADATA_KEY)
    return tensors, json.loads(raw) if raw else {}


def _lora_path(source: str | os.PathLike, weight_name: str | None) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if weight_name:
            return path / weight_name
        if (path / LORA_WEIGHT_NAME).is_file():
            return path / LORA_WEIGHT_NAME
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"LoRA folder {path}: no {LORA_WEIGHT_NAME}, and {len(files)} .safetensors "
                "files; name one with weight_name"
            )
        return files[0]
    if isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, weight_name or LORA_WEIGHT_NAME))
    raise FileNotFoundError(f"LoRA {str(source)!r}: no such file or folder, and not a Hub id")


def _split_key(key: str) -> tuple[str, str, str]:
    """(model, module name as in the file, what) of one LoRA key."""
    for bad in UNSUPPORTED:
        if bad in key:
            raise ValueError(f"LoRA key {key!r}: {bad.strip('._')} is not supported (LoRA only)")
    suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"LoRA key {key!r} is not a LoRA tensor (expected endings: "
                         f"{', '.join(SUFFIXES)})")  # fmt: skip
    module, what = key.removesuffix(suffix), SUFFIXES[suffix]
    if module.startswith("lora_te2_"):
        raise ValueError(f"LoRA key {key!r}: a second text encoder (SDXL) is not supported")
    for prefix, model in KOHYA_PREFIXES.items():
        if module.startswith(prefix):
            return model, module.removeprefix(prefix), what
    model, _, rest = module.partition(".")
    if model in MODELS and rest:
        return model, _legacy_name(rest), what
    return "unet", _legacy_name(module), what  # a bare U-Net state dict


def _legacy_name(name: str) -> str:
    """diffusers' attention-processor names (attn1.processor.to_out) -> module names."""
    return re.sub(r"\.to_out$", ".to_out.0", name.replace(".processor.", "."))


def _peft_scale(metadata: dict, model: str, name: str, rank: int) -> float:
    """alpha / r of one module from diffusers' metadata (alpha = r when there is none)."""
    alpha = metadata.get(f"{model}.lora_alpha", rank)
    for pattern, value in (metadata.get(f"{model}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", name):
            alpha = value
    root = math.sqrt(rank) if metadata.get(f"{model}.use_rslora") else rank
    return float(alpha) / root


def lora_factors(
    tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> dict[str, dict[str, LoraFactor]]:
    """{model: {module name as in the file: LoraFactor}} of a LoRA state dict, any format."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        model, module, what = _split_key(key)
        parts.setdefault((model, module), {})[what] = tensor
    out: dict[str, dict[str, LoraFactor]] = {}
    for (model, module), found in parts.items():
        if "down" not in found or "up" not in found:
            raise ValueError(f"LoRA for {model} module {module!r}: has {sorted(found)}, needs "
                             "both the down (A) and the up (B) weight")  # fmt: skip
        rank = found["down"].shape[0]
        if "alpha" in found:
            scale = float(found["alpha"]) / rank
        else:
            scale = _peft_scale(metadata or {}, model, module, rank)
        out.setdefault(model, {})[module] = LoraFactor(found["down"], found["up"], scale)
    return out


def to_kohya(
    tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> dict[str, torch.Tensor]:
    """A LoRA state dict (any format) in the kohya / A1111 format: lora_unet_..., lora_te_..."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    out = {}
    for model, modules in lora_factors(tensors, metadata).items():
        for module, factor in modules.items():
            name = prefixes[model] + module.replace(".", "_")
            rank = factor.down.shape[0]
            out[f"{name}.lora_down.weight"] = factor.down
            out[f"{name}.lora_up.weight"] = factor.up
            out[f"{name}.alpha"] = torch.tensor(factor.scale * rank)
    return out


# ==== weights a LoRA can change ====


@dataclass
class Slot:
    """A weight by module name: a whole parameter, or some rows of a fused q/k/v weight."""

    param: nn.Parameter
    rows: slice | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.param if self.rows is None else self.param[self.rows]

    @torch.no_grad()
    def write(self, value: torch.Tensor) -> None:
        # in place: the parameter keeps its storage (compiled graphs, CUDA graphs see it)
        self.weight.copy_(value)


def slots(model: nn.Module) -> dict[str, Slot]:
    """Every weight (2-D or more) by module name, fused attention projections included."""
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.ndim >= 2:
            out[name] = Slot(weight)
        fused = getattr(module, "qkv_weight", None)
        if isinstance(fused, nn.Parameter):
            inner = fused.shape[0] // len(QKV)
            for i, proj in enumerate(QKV):
                rows = slice(i * inner, (i + 1) * inner)
                out[f"{name}.{proj}" if name else proj] = Slot(fused, rows)
    return out


def _resolve(model_name: str, names, found: dict[str, Slot]) -> dict[str, str]:
    """File module names -> slot names: dotted names directly, kohya names by '.' -> '_'."""
    aliases = {n: n for n in found}
    if model_name == "text_encoder":  # transformers 5 flattens CLIPTextModel's text_model
        for n in found:
            aliases.setdefault(n.removeprefix("text_model."), n)
            aliases.setdefault("text_model." + n, n)
    underscored = {a.replace(".", "_"): n for a, n in aliases.items()}
    out = {name: aliases.get(name) or underscored.get(name) for name in names}
    unknown = [name for name, target in out.items() if target is None]
    if unknown:
        raise ValueError(
            f"LoRA: {len(unknown)} {model_name} modules not found in this model, e.g. "
            f"{', '.join(unknown[:4])} (a LoRA made for another architecture?)"
        )
    return out


# ==== merged LoRAs per model ====


@dataclass
class Merged:
    """The weights before any LoRA (CPU copies) and the LoRAs merged into one model."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    loras: dict[str, tuple[dict[str, LoraFactor], float]] = field(default_factory=dict)


_MERGED: weakref.WeakKeyDictionary[nn.Module, Merged] = weakref.WeakKeyDictionary()


def _models(pipe) -> dict[str, nn.Module]:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder.model}


@torch.no_grad()
def _remerge(model: nn.Module, state: Merged, names) -> None:
    """W = W0 + sum over the loaded LoRAs of s * delta, for the slots `names`."""
    found = slots(model)
    for name in names:
        slot = found[name]
        w = state.originals[name].to(slot.param.device, torch.float32)
        for factors, scale in state.loras.values():
            if name in factors and scale != 0:
                w = w + scale * factors[name].delta(w.shape, w.device)
        slot.write(w.to(slot.param.dtype))


def load_lora(
    pipe,
    source,
    scale: float = 1.0,
    *,
    adapter_name: str | None = None,
    weight_name: str | None = None,
) -> str:
    """Merge a LoRA into the pipeline's U-Net and text encoder at `scale`; returns its name.

    Args:
        pipe: a DiffusionPipeline.
        source: a LoRA .safetensors file, a folder with pytorch_lora_weights.safetensors, a
            Hub id, or a state dict (diffusers / peft, older diffusers, or kohya / A1111 keys).
        scale: s in W0 + s * (alpha / r) B A; 0 keeps it loaded but off.
        adapter_name: a name for unload_lora / set_lora_scale; default: the file's stem.
        weight_name: the file inside a folder or Hub repo.
    """
    if isinstance(source, dict):
        tensors, metadata, default = source, {}, "lora"
    else:
        tensors, metadata = read_lora_file(source, weight_name)
        default = Path(str(source)).stem or "lora"
    taken = set(active_loras(pipe))
    name = adapter_name or next(n for n in (default, *(f"{default}_{i}" for i in range(1, 999)))
                                if n not in taken)  # fmt: skip
    if name in taken:
        raise ValueError(f"adapter_name={name!r} is already loaded; unload it or pick another")
    models = _models(pipe)
    resolved = {}
    for model_name, factors in lora_factors(tensors, metadata).items():
        model = models[model_name]
        found = slots(model)
        names = _resolve(model_name, factors, found)
        for file_name, slot_name in names.items():
            factors[file_name].delta(found[slot_name].weight.shape)  # shape check before merging
        resolved[model_name] = {names[k]: f for k, f in factors.items()}
    for model_name, factors in resolved.items():
        model = models[model_name]
        state = _MERGED.setdefault(model, Merged())
        found = slots(model)
        for slot_name in factors:
            if slot_name not in state.originals:
                state.originals[slot_name] = found[slot_name].weight.detach().to("cpu", copy=True)
        state.loras[name] = (factors, float(scale))
        _remerge(model, state, factors)
    return name


def unload_lora(pipe, adapter_name: str | None = None) -> None:
    """Remove one LoRA (or all, with None), restoring the weights it changed."""
    if adapter_name is not None and adapter_name not in active_loras(pipe):
        raise ValueError(f"adapter_name={adapter_name!r} is not loaded; loaded: "
                         f"{', '.join(active_loras(pipe)) or '(none)'}")  # fmt: skip
    for model in _models(pipe).values():
        state = _MERGED.get(model)
        if state is None:
            continue
        drop = list(state.loras) if adapter_name is None else [adapter_name]
        touched = {n for a in drop if a in state.loras for n in state.loras.pop(a)[0]}
        _remerge(model, state, touched)
        still = {n for factors, _ in state.loras.values() for n in factors}
        for n in touched - still:  # back to W0 exactly: the copy is no longer needed
            del state.originals[n]
        if not state.loras:
            del _MERGED[model]


def set_lora_scale(pipe, adapter_name: str, scale: float) -> None:
    """Change the scale s of a loaded LoRA."""
    if adapter_name not in active_loras(pipe):
        raise ValueError(f"adapter_name={adapter_name!r} is not loaded; loaded: "
                         f"{', '.join(active_loras(pipe)) or '(none)'}")  # fmt: skip
    for model in _models(pipe).values():
        state = _MERGED.get(model)
        if state is not None and adapter_name in state.loras:
            factors, _ = state.loras[adapter_name]
            state.loras[adapter_name] = (factors, float(scale))
            _remerge(model, state, factors)


def active_loras(pipe) -> dict[str, float]:
    """{name: scale} of the LoRAs merged into the pipeline, in loading order."""
    out: dict[str, float] = {}
    for model in _models(pipe).values():
        state = _MERGED.get(model)
        if state is not None:
            out |= {name: scale for name, (_, scale) in state.loras.items()}
    return out
