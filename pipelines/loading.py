"""Reading and writing model folders: the diffusers layout, single original files, Hub ids.

A diffusers pipeline folder holds `model_index.json` and one subfolder per component:
`unet/`, `vae/` (config.json + diffusion_pytorch_model.safetensors), `text_encoder/` +
`tokenizer/` (transformers' layout) and `scheduler/scheduler_config.json`. Weights are read with
safetensors, or with `torch.load(weights_only=True)`: loading never runs pickle code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.schedule import ScheduleConfig
from ldm.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose loader reads everything we write

# diffusers scheduler class -> our sampler name; the scheduler config says which one a folder uses
SCHEDULER_TO_SAMPLER = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}
SAMPLER_TO_SCHEDULER = {v: k for k, v in SCHEDULER_TO_SAMPLER.items()}
GENERATION_DEFAULTS = "generation_defaults.json"  # steps / guidance a folder recommends
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


@dataclass
class Components:
    """What a pipeline is made of, as loaded from disk."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: object  # a text_encoder.TextEncoder
    schedule: ScheduleConfig
    sampler: str
    use_karras_sigmas: bool = False
    source: str = ""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    return json.loads(path.read_text())


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_generation_defaults(root: Path) -> dict:
    """{"num_inference_steps": ..., "guidance_scale": ...} from a model folder, if it has them."""
    path = root / GENERATION_DEFAULTS
    if not (root.is_dir() and path.is_file()):
        return {}
    allowed = {"num_inference_steps", "guidance_scale"}
    data = json.loads(path.read_text())
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return data


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in a component folder (safetensors first, then a safe pickle)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return load_weights_file(path)
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(WEIGHT_FILES)})")


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file, refusing pickles that would run code and naming corrupt files."""
    from pipelines.single_file import load_state_dict_file

    return load_state_dict_file(path)


def _build(module_cls, config, state_dict: dict[str, torch.Tensor]):
    # Build on the meta device and adopt the loaded tensors: no time spent on a random init.
    with torch.device("meta"):
        model = module_cls(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_unet(folder: Path) -> UNet:
    return _build(
        UNet, UNetConfig.from_diffusers(read_json(folder / "config.json")), load_weights(folder)
    )


def load_vae(folder: Path) -> AutoencoderKL:
    config = AutoencoderConfig.from_diffusers(read_json(folder / "config.json"))
    return _build(AutoencoderKL, config, load_weights(folder))


def load_text_encoder(root: Path, class_name: str):
    from text_encoder import ClipTextEncoder, T5TextEncoder

    if class_name == "CLIPTextModel":
        return ClipTextEncoder.from_pretrained(root)
    if class_name == "T5EncoderModel":
        return T5TextEncoder.from_pretrained(root)
    raise ValueError(
        f"text_encoder: unsupported class {class_name!r} in model_index.json; "
        "supported: CLIPTextModel, T5EncoderModel"
    )


def sampler_for(scheduler_config: dict) -> tuple[str, bool]:
    """The sampler name (and Karras flag) matching a folder's diffusers scheduler class."""
    class_name = scheduler_config.get("_class_name", "DDIMScheduler")
    if class_name not in SCHEDULER_TO_SAMPLER:
        raise ValueError(
            f"scheduler: unsupported class {class_name!r}; supported: "
            f"{', '.join(SCHEDULER_TO_SAMPLER)} (or pass sampler=...)"
        )
    if class_name == "PNDMScheduler" and not scheduler_config.get("skip_prk_steps", False):
        raise ValueError(
            "scheduler: PNDMScheduler with skip_prk_steps=false (Runge-Kutta warm-up) "
            "is not supported; set skip_prk_steps to true (as Stable Diffusion "
            "folders do) or pass sampler=..."
        )
    return SCHEDULER_TO_SAMPLER[class_name], bool(scheduler_config.get("use_karras_sigmas", False))


def merge_schedule(schedule: ScheduleConfig, prediction_type: str | None) -> ScheduleConfig:
    """Apply an explicit prediction type, refusing one that contradicts the folder's."""
    if prediction_type is None or prediction_type == schedule.prediction_type:
        return schedule
    raise ValueError(
        f"prediction_type={prediction_type!r} contradicts the model's scheduler config "
        f"({schedule.prediction_type!r}); leave it unset or fix scheduler_config.json"
    )


def load_folder(root: Path, prediction_type: str | None = None) -> Components:
    """A diffusers pipeline folder -> Components."""
    index = read_json(root / "model_index.json")
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        if not (root / name).is_dir():
            raise FileNotFoundError(
                f"{root} has no {name}/ folder, which model_index.json requires"
            )
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    sampler, karras = sampler_for(scheduler_config)
    schedule = merge_schedule(ScheduleConfig.from_diffusers(scheduler_config), prediction_type)
    text_class = (index.get("text_encoder") or [None, "CLIPTextModel"])[1]
    return Components(
        unet=load_unet(root / "unet"),
        vae=load_vae(root / "vae"),
        text_encoder=load_text_encoder(root, text_class),
        schedule=schedule,
        sampler=sampler,
        use_karras_sigmas=karras,
        source=str(root),
    )


def _prediction_type_from_sidecar(path: Path) -> str | None:
    """An original checkpoint's YAML beside it says `parameterization: "v"` for v-models."""
    yaml = path.with_suffix(".yaml")
    if yaml.is_file() and re.search(
        r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(), re.M
    ):
        return "v_prediction"
    return None


def load_single_file(path: Path, prediction_type: str | None = None) -> Components:
    """One original (CompVis / A1111) checkpoint -> Components; architecture read from shapes."""
    from pipelines.single_file import infer_configs, original_to_diffusers

    state = load_weights_file(path)
    prediction_type = prediction_type or _prediction_type_from_sidecar(path) or "epsilon"
    configs = infer_configs(state, prediction_type)
    parts = original_to_diffusers(state)
    schedule = ScheduleConfig(prediction_type=prediction_type)
    unet = _build(UNet, UNetConfig.from_diffusers(configs["unet"]), parts["unet"])
    vae = _build(AutoencoderKL, AutoencoderConfig.from_diffusers(configs["vae"]), parts["vae"])
    # SD 2.x (OpenCLIP) tokenizers pad with "!" (id 0), OpenAI CLIP's with the end token
    pad = "!" if configs.get("text_encoder_format") == "open_clip" else "<|endoftext|>"
    text_encoder = _clip_from_state_dict(parts["text_encoder"], configs["text_encoder"], pad)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        schedule=schedule,
        sampler="ddim",
        source=str(path),
    )


def _clip_from_state_dict(state: dict, config: dict, pad_token: str):
    from text_encoder import ClipBpeTokenizer, ClipTextConfig, ClipTextEncoder, ClipTextModel

    model = ClipTextModel.from_state_dict(state, ClipTextConfig.from_dict(config))
    tokenizer = ClipBpeTokenizer.offline(model.config.max_position_embeddings, pad_token=pad_token)
    return ClipTextEncoder(model.eval().requires_grad_(False), tokenizer)


def resolve(
    path_or_id: str | os.PathLike | None, revision: str | None = None, subfolder: str | None = None
) -> Path:
    """A local folder or file, the embedded default model, or a Hub id fetched through its cache."""
    if path_or_id is None:
        return DEFAULT_MODEL
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path / subfolder if subfolder else path
    if isinstance(path_or_id, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_id):
        from pipelines.hub import download

        root = download(path_or_id, revision=revision)
        return root / subfolder if subfolder else root
    raise FileNotFoundError(
        f"model {str(path_or_id)!r}: no such file or folder, and not a Hub id "
        "of the form 'user/name'"
    )


def load(
    path_or_id=None,
    *,
    prediction_type: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
) -> Components:
    """Components from a diffusers folder, a single checkpoint file or a Hub id."""
    path = resolve(path_or_id, revision, subfolder)
    if path.is_dir():
        return load_folder(path, prediction_type)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return load_single_file(path, prediction_type)
    raise ValueError(
        f"model {str(path)!r}: expected a diffusers folder or a .safetensors/.ckpt file"
    )


def model_index(text_encoder_class: str, scheduler_class: str) -> dict:
    """model_index.json for diffusers' StableDiffusionPipeline."""
    library = "transformers"
    tokenizer = "CLIPTokenizer" if text_encoder_class == "CLIPTextModel" else "T5TokenizerFast"
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": [library, text_encoder_class],
        "tokenizer": [library, tokenizer],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_module(folder: Path, class_name: str, config: dict, module: torch.nn.Module) -> None:
    """config.json + diffusion_pytorch_model.safetensors, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = folder / "diffusion_pytorch_model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "diffusion_pytorch_model.safetensors")


def save_folder(root: Path, components: Components) -> None:
    """Write Components in the diffusers layout (StableDiffusionPipeline loads it)."""
    root = Path(root)
    save_module(
        root / "unet",
        "UNet2DConditionModel",
        components.unet.config.to_diffusers(),
        components.unet,
    )
    save_module(root / "vae", "AutoencoderKL", components.vae.config.to_diffusers(), components.vae)
    components.text_encoder.save_pretrained(root)
    scheduler_class = SAMPLER_TO_SCHEDULER.get(components.sampler, "DDIMScheduler")
    scheduler = components.schedule.to_diffusers(scheduler_class)
    if components.use_karras_sigmas:
        scheduler["use_karras_sigmas"] = True
    if scheduler_class == "PNDMScheduler":
        scheduler["skip_prk_steps"] = True  # PLMS only, the part we implement
    write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    # our own torch CLIP text model saves the transformers CLIPTextModel format
    text_class = (
        "T5EncoderModel" if "T5" in type(components.text_encoder).__name__ else "CLIPTextModel"
    )
    write_json(root / "model_index.json", model_index(text_class, scheduler_class))
