"""Model cards: the README.md the Hugging Face Hub shows for a model repo.

A card is YAML metadata between `---` lines (library_name, pipeline_tag, tags, license,
base_model for fine-tunes, a sample-image widget) followed by Markdown: what the model is,
sample images with their prompts, how to load it here and in diffusers, the training
configuration, and the training data (its size and a content hash, see `dataset_hash`).

`ldm train` writes one beside every model it saves, and every push writes one. A card written
before the repo id is known names the repo `REPO_PLACEHOLDER`; a push fills the id in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

CARD_NAME = "README.md"
MARKER = "<!-- model card written by ldm-t2i -->"  # lets a push recognise a card it may update
REPO_PLACEHOLDER = "{repo_id}"  # plain text, also inside a heading or code
PROJECT_TAG = "ldm-t2i"
DEFAULT_LICENSE = "openrail++"
# Hub license identifiers (https://huggingface.co/docs/hub/repositories-licenses) most used for
# image models; anything else: license="other" and name it in the card's text.
LICENSES = (
    "openrail++",
    "creativeml-openrail-m",
    "openrail",
    "apache-2.0",
    "mit",
    "bsd-3-clause",
    "cc0-1.0",
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "gpl-3.0",
    "agpl-3.0",
    "unlicense",
    "other",
)
KINDS = ("pipeline", "unet", "vae", "text_encoder", "lora")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_CONFIG_CLASS_TO_KIND = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}

_DESCRIPTIONS = {
    "pipeline": "A latent diffusion text-to-image pipeline (U-Net, KL autoencoder, text encoder "
    "and scheduler) in the diffusers folder layout, safetensors weights.",
    "unet": "The denoising U-Net of a latent diffusion text-to-image model (diffusers' "
    "UNet2DConditionModel layout, safetensors weights).",
    "vae": "The KL autoencoder of a latent diffusion model (diffusers' AutoencoderKL layout, "
    "safetensors weights).",
    "text_encoder": "The text encoder and tokenizer of a latent diffusion text-to-image model "
    "(transformers' layout in text_encoder/ and tokenizer/, safetensors weights).",
    "lora": "LoRA weights for a latent diffusion text-to-image model (safetensors).",
}


# ---- the training data's fingerprint ---------------------------------------------------------


def dataset_hash(folder: str | os.PathLike) -> str:
    """sha256 (hex) over a folder's files, sorted by relative path: each path, size and bytes.

    Hidden files and folders (names starting with ".") are left out, so caches and OS metadata
    do not change the hash; the size before the bytes keeps file boundaries unambiguous.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    digest = hashlib.sha256()
    for rel in visible_files(root):
        path = root / rel
        digest.update(rel.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def visible_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files under root, hidden ones left out, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(found)


# ---- what a folder holds -----------------------------------------------------------------------


def detect_kind(path: str | os.PathLike) -> str:
    """Which of KINDS a folder (or a single file) holds, from its files."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return "lora"
        raise ValueError(f"{str(path)!r}: a single file must be .safetensors (LoRA weights)")
    if (path / "model_index.json").is_file():
        return "pipeline"
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if config.get("_class_name") in _CONFIG_CLASS_TO_KIND:
            return _CONFIG_CLASS_TO_KIND[config["_class_name"]]
    if (path / "text_encoder" / "config.json").is_file():
        return "text_encoder"
    if any(path.glob("*.safetensors")):
        return "lora"
    raise ValueError(
        f"{str(path)!r} holds no model: expected a pipeline folder "
        "(model_index.json), a U-Net or autoencoder folder (config.json), "
        "text_encoder/, or LoRA .safetensors files"
    )


def hub_id_of(model: str | os.PathLike | None) -> str | None:
    """The Hub id behind a model name: 'user/name' itself, or the repo of a Hub cache snapshot."""
    if model is None:
        return None
    text = str(model)
    if HUB_ID.fullmatch(text) and not Path(text).exists():
        return text
    for part in reversed(Path(text).parts):  # .../models--user--name/snapshots/<commit>
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    return None


# ---- the card ----------------------------------------------------------------------------------


def card_metadata(
    kind: str,
    *,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    tags=(),
    samples=None,
) -> dict:
    """The YAML front matter as a dict (keys the Hub reads)."""
    _check_choice("kind", kind, KINDS)
    _check_choice("license", license, LICENSES)
    all_tags = [PROJECT_TAG, "text-to-image"]
    all_tags += {"pipeline": ["stable-diffusion", "diffusers"], "lora": ["lora", "diffusers"]}.get(
        kind, [kind]
    )
    all_tags += [t for t in tags if t not in all_tags]
    meta = {"library_name": "transformers" if kind == "text_encoder" else "diffusers"}
    if kind in ("pipeline", "lora"):  # a lone component cannot make images: no widget for it
        meta["pipeline_tag"] = "text-to-image"
    meta["license"] = license
    meta["tags"] = all_tags
    hub_base = hub_id_of(base_model)
    if hub_base is not None:  # the Hub refuses base_model values that are not repo ids
        meta["base_model"] = hub_base
        meta["base_model_relation"] = "adapter" if kind == "lora" else "finetune"
    if samples and kind in ("pipeline", "lora"):
        meta["widget"] = [{"text": prompt, "output": {"url": rel}} for rel, prompt in samples]
    return meta


def render_model_card(
    kind: str,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    training: dict | None = None,
    dataset: dict | None = None,
    samples=None,
    license: str = DEFAULT_LICENSE,
    tags=(),
    weight_name: str | None = None,
) -> str:
    """The README.md text: YAML metadata, then the Markdown sections."""
    from huggingface_hub import ModelCardData

    samples = [(str(rel), str(prompt)) for rel, prompt in (samples or [])]
    meta = card_metadata(kind, base_model=base_model, license=license, tags=tags, samples=samples)
    yaml = ModelCardData(**meta).to_yaml()
    repo = repo_id or REPO_PLACEHOLDER
    parts = [f"---\n{yaml}\n---", MARKER, f"# {repo}", _DESCRIPTIONS[kind]]
    if base_model is not None:
        parts.append(f"Fine-tuned from {_model_link(base_model)}.")
    if samples:
        parts.append(_samples_section(samples))
    parts.append(_usage_section(kind, repo, weight_name))
    if training:
        parts.append(_training_section(training))
    if dataset:
        parts.append(_dataset_section(dataset))
    return "\n\n".join(parts) + "\n"


def write_model_card(
    folder: str | os.PathLike,
    *,
    base_model: str | None = None,
    training: dict | None = None,
    dataset: dict | None = None,
    samples=None,
    license: str = DEFAULT_LICENSE,
    tags=(),
    repo_id: str | None = None,
    kind: str | None = None,
) -> Path:
    """Write <folder>/README.md, the model card, and return its path.

    Args:
        folder: the saved model (pipeline folder, component folder, or LoRA weights folder).
        base_model: the model this one was fine-tuned from (Hub id or path), if any.
        training: the training configuration, e.g. {"steps": 1000, "lr": 1e-4, ...}.
        dataset: {"size": number of examples, "content_hash": dataset_hash(...),
            "description": free text}.
        samples: [(image path relative to folder, prompt), ...]; the images must exist.
        license: a Hub license identifier (LICENSES).
        tags: extra Hub tags.
        repo_id: the Hub repo the card will live in; None writes REPO_PLACEHOLDER, which a push
            replaces.
        kind: what the folder holds (KINDS); None: detected from its files.
    """
    folder = Path(folder)
    kind = kind or detect_kind(folder)
    samples = _check_samples(folder, samples)
    weights = sorted(p.name for p in folder.glob("*.safetensors")) if kind == "lora" else []
    text = render_model_card(
        kind,
        repo_id=repo_id,
        base_model=base_model,
        training=training,
        dataset=dataset,
        samples=samples,
        license=license,
        tags=tags,
        weight_name=weights[0] if len(weights) == 1 else None,
    )
    path = folder / CARD_NAME
    tmp = path.with_name(CARD_NAME + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def fill_repo_id(card: str, repo_id: str) -> str:
    """A card written by write_model_card(repo_id=None), with the repo id filled in."""
    if MARKER not in card:
        return card  # someone else's card: pushed exactly as written
    return card.replace(REPO_PLACEHOLDER, repo_id)


# ---- sections ----------------------------------------------------------------------------------


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(allowed)}")


def _check_samples(folder: Path, samples) -> list[tuple[str, str]]:
    """Sample (image, prompt) pairs as POSIX paths relative to folder, each image present."""
    checked = []
    for rel, prompt in samples or []:
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts:
            raise ValueError(
                f"samples: image path {str(rel)!r} must be relative to the folder and inside it"
            )
        if not (folder / rel_path).is_file():
            raise FileNotFoundError(f"samples: image {str(rel)!r} does not exist in {folder}")
        checked.append((rel_path.as_posix(), str(prompt)))
    return checked


def _cell(text) -> str:
    """Text safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _model_link(model: str) -> str:
    hub = hub_id_of(model)
    return f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{Path(str(model)).name}`"


def _samples_section(samples: list[tuple[str, str]]) -> str:
    rows = [f"| ![{_cell(p)}]({quote(rel)}) | {_cell(p)} |" for rel, p in samples]
    return "\n".join(["## Samples", "", "| image | prompt |", "|---|---|", *rows])


def _usage_section(kind: str, repo: str, weight_name: str | None) -> str:
    here, theirs = _USAGE[kind]
    weight = f', weight_name="{weight_name}"' if weight_name else ""
    fill = {"repo": repo, "weight": weight}
    return "\n".join(
        [
            "## How to use",
            "",
            "With this project (ldm-t2i):",
            "",
            "```python",
            here.format(**fill),
            "```",
            "",
            theirs[0] + ":",
            "",
            "```python",
            theirs[1].format(**fill),
            "```",
        ]
    )


_USAGE = {
    "pipeline": (
        "from pipelines import TextToImagePipeline\n\n"
        'pipe = TextToImagePipeline.from_pretrained("{repo}")\n'
        'image = pipe("a red circle above a blue square").images[0]',
        (
            "With diffusers",
            "from diffusers import StableDiffusionPipeline\n\n"
            'pipe = StableDiffusionPipeline.from_pretrained("{repo}")\n'
            'image = pipe("a red circle above a blue square").images[0]',
        ),
    ),
    "unet": (
        'from pipelines.loading import load_unet, resolve\n\nunet = load_unet(resolve("{repo}"))',
        (
            "With diffusers",
            "from diffusers import UNet2DConditionModel\n\n"
            'unet = UNet2DConditionModel.from_pretrained("{repo}")',
        ),
    ),
    "vae": (
        'from pipelines.loading import load_vae, resolve\n\nvae = load_vae(resolve("{repo}"))',
        (
            "With diffusers",
            'from diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("{repo}")',
        ),
    ),
    "text_encoder": (
        "from pipelines.loading import resolve\n"
        "from text_encoder import ClipTextEncoder\n\n"
        'encoder = ClipTextEncoder.from_pretrained(resolve("{repo}"))',
        (
            "With transformers",
            "from transformers import CLIPTextModel, CLIPTokenizer\n\n"
            'model = CLIPTextModel.from_pretrained("{repo}", subfolder="text_encoder")\n'
            'tokenizer = CLIPTokenizer.from_pretrained("{repo}", subfolder="tokenizer")',
        ),
    ),
    "lora": (
        "from pipelines.loading import resolve\n\n"
        'folder = resolve("{repo}")  # the LoRA .safetensors files, from the Hub cache',
        ("With diffusers, on top of its base model", 'pipe.load_lora_weights("{repo}"{weight})'),
    ),
}


def _training_section(training: dict) -> str:
    rows = [f"| {_cell(k)} | {_cell(_value(v))} |" for k, v in training.items()]
    return "\n".join(["## Training", "", "| setting | value |", "|---|---|", *rows])


def _dataset_section(dataset: dict) -> str:
    known = ("size", "content_hash", "description")
    unknown = sorted(set(dataset) - set(known))
    if unknown:
        raise ValueError(f"dataset: unknown keys {unknown}; allowed: {', '.join(known)}")
    lines = ["## Training data", ""]
    if dataset.get("description"):
        lines += [str(dataset["description"]).strip(), ""]
    if dataset.get("size") is not None:
        lines.append(f"- size: {dataset['size']} examples")
    if dataset.get("content_hash"):
        lines.append(
            f"- content hash: `sha256:{dataset['content_hash']}` (sha256 over the "
            "sorted file names, sizes and bytes: `pipelines.model_card.dataset_hash`)"
        )
    return "\n".join(lines)


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
