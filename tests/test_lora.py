"""LoRA: trained with `ldm train --lora-rank`, saved in diffusers' format, loaded here and there.

A tiny diffusers pipeline folder (tests/tiny.py) is fine-tuned with LoRA on the U-Net and the
text encoder for three steps; the file it writes is loaded into our pipeline (merged at a
scale) and into diffusers' (load_lora_weights + set_adapters at the same scale), and the images
are compared. Also: several LoRAs at once, unloading back to the exact weights, the kohya /
A1111 twin of the file, fused q/k/v projections, resume, and clear errors.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.lora import (
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    active_loras,
    load_lora,
    read_lora_file,
    set_lora_scale,
    to_kohya,
    unload_lora,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import SD_SCHEDULER, save_reference  # noqa: E402

PROMPT = "a red circle"
CALL = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
# Ours merges W + s·c·BA, diffusers runs W x + s·c·B(A x): the same maths in another float32
# order. Over 3 DDIM steps of the tiny pipeline the images differed by <= 9e-7 (max abs, in
# [0, 1]); 1e-5 leaves room for other BLAS builds and is far below a LoRA's effect (~0.25).
IMAGE_TOL = 1e-5


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory) -> Path:
    return save_reference(tmp_path_factory.mktemp("ref") / "pipe", "sd1", SD_SCHEDULER)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a red circle number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


TRAIN_ARGS = ["--resolution", "16", "--max-steps", "3", "--batch-size", "2", "--lora-rank", "4",
              "--lora-alpha", "8", "--train-text-encoder", "--learning-rate", "5e-2",
              "--checkpoint-every", "2", "--no-progress", "--gradient-checkpointing",
              "--validation-prompt", PROMPT, "--validation-every", "3", "--validation-images", "1",
              "--validation-steps", "2"]  # fmt: skip


def train_lora(ref_dir, data_dir, out, *extra) -> int:
    from train.cli import main

    return main(["--model", str(ref_dir), "--data", str(data_dir), "--output", str(out),
                 *TRAIN_ARGS, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def trained(ref_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    assert train_lora(ref_dir, data_dir, out) == 0
    return out


def ours(ref_dir):
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(ref_dir)
    pipe.progress = False
    return pipe


def image(pipe):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images


def weights(pipe) -> dict[str, torch.Tensor]:
    """Copies of every U-Net and text-encoder tensor."""
    return {
        **{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
        **{f"te.{k}": v.clone() for k, v in pipe.text_encoder.model.state_dict().items()},
    }


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def theirs(ref_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ref_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(pipe, seed: int) -> tuple[dict, dict]:
    """A diffusers-format LoRA of rank 2 on the U-Net's cross-attention k/v (alpha 1)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            out_f, in_f = module.weight.shape
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(2, in_f, generator=g) * 0.3
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
    metadata = {
        "unet.r": 2,
        "unet.lora_alpha": 1.0,
        "unet.target_modules": ["attn2.to_k", "attn2.to_v"],
    }
    return tensors, metadata


def write_lora(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    header = {"format": "pt"} | ({METADATA_KEY: json.dumps(metadata)} if metadata else {})
    save_file(tensors, str(path), metadata=header)
    return path


# ---- the trained file ----


def test_trained_file_is_in_the_diffusers_peft_format(trained):
    path = trained / LORA_WEIGHT_NAME
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()[METADATA_KEY])
        block = "attentions.0.transformer_blocks.0"
        a = f.get_tensor(f"unet.down_blocks.0.{block}.attn1.to_q.lora_A.weight")
        b = f.get_tensor(f"unet.up_blocks.1.{block}.attn2.to_out.0.lora_B.weight")
    assert a.shape == (4, 32) and b.shape == (32, 4)
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in keys
    # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions x 4 projections, 2 text layers
    # x 4 projections; each has A and B
    assert len(keys) == (4 * 2 * 4 + 2 * 4) * 2
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert meta["unet.lora_alpha"] == 8 and meta["unet.r"] == 4
    assert sorted(meta["text_encoder.target_modules"]) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    # a LoRA run checkpoints its factors only
    from train.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(trained / "checkpoints" / "checkpoint-00000003")
    assert set(tensors) == {"unet", "text_encoder"}
    assert all(".lora_" in k for group in tensors.values() for k in group)
    assert "lora" in (trained / "README.md").read_text()
    assert (trained / "validation" / "step-00000003.png").is_file()  # rendered through peft layers


def test_resumed_lora_run_writes_the_same_file(ref_dir, data_dir, trained, tmp_path):
    shutil.copytree(trained / "checkpoints" / "checkpoint-00000002",
                    tmp_path / "checkpoints" / "checkpoint-00000002")  # fmt: skip
    assert train_lora(ref_dir, data_dir, tmp_path, "--resume", "latest") == 0
    (resumed, meta), (full, meta_full) = read_lora_file(tmp_path), read_lora_file(trained)
    assert meta == meta_full and resumed.keys() == full.keys()
    assert all(torch.equal(resumed[k], full[k]) for k in full)  # bitwise: resume is exact


# ---- parity with diffusers ----


def test_trained_lora_changes_the_image_and_matches_diffusers(ref_dir, trained, theirs):
    pipe = ours(ref_dir)
    before, base = weights(pipe), image(pipe)
    name = load_lora(pipe, trained, scale=0.7)
    assert active_loras(pipe) == {name: 0.7}
    touched = changed(before, weights(pipe))
    assert any(k.startswith("te.") for k in touched) and any("attn1.to_q" in k for k in touched)
    assert all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                           "_proj.weight")) for k in touched)  # fmt: skip
    with_lora = image(pipe)
    assert np.abs(with_lora - base).max() > 0.05  # the LoRA learnt something visible

    theirs.load_lora_weights(trained, adapter_name="trained")
    theirs.set_adapters(["trained"], adapter_weights=[0.7])
    reference = theirs(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images
    theirs.delete_adapters("trained")
    assert np.abs(reference - with_lora).max() < IMAGE_TOL

    unload_lora(pipe)
    assert active_loras(pipe) == {} and not changed(before, weights(pipe))  # bitwise restored
    assert np.array_equal(image(pipe), base)


def test_several_loras_at_once_rescaled_and_unloaded_one_by_one(ref_dir, trained, theirs,
                                                                 tmp_path):  # fmt: skip
    pipe = ours(ref_dir)
    before = weights(pipe)
    extra = write_lora(tmp_path / "extra.safetensors", *random_lora(pipe, 1))
    load_lora(pipe, trained, scale=0.5, adapter_name="a")
    load_lora(pipe, extra, scale=0.3, adapter_name="b")  # overlaps "a" on attn2.to_k / to_v
    set_lora_scale(pipe, "b", 1.5)
    both = image(pipe)
    theirs.load_lora_weights(trained, adapter_name="a")
    theirs.load_lora_weights(extra, adapter_name="b")
    theirs.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
    reference = theirs(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images
    theirs.delete_adapters(["a", "b"])
    assert np.abs(reference - both).max() < IMAGE_TOL

    unload_lora(pipe, "a")
    only_b = weights(pipe)
    pipe_b = ours(ref_dir)
    load_lora(pipe_b, extra, scale=1.5)
    assert not changed(only_b, weights(pipe_b))  # W0 + b, recomputed exactly
    unload_lora(pipe, "b")
    assert not changed(before, weights(pipe))


# ---- the kohya / A1111 format ----


def kohya_twin(tensors: dict, alpha: float) -> dict:
    """The kohya file of a diffusers-format LoRA, built by the naming rule itself."""
    out = {}
    for key, value in tensors.items():
        model, _, rest = key.partition(".")
        module, _, which = rest.rpartition(".lora_")
        stem = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[model] + module.replace(".", "_")
        out[f"{stem}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def test_kohya_twin_loads_to_the_same_weights_here_and_in_diffusers(ref_dir, trained, theirs,
                                                                     tmp_path):  # fmt: skip
    tensors, metadata = read_lora_file(trained)
    twin = kohya_twin(tensors, alpha=8.0)
    block = "attentions_0_transformer_blocks_0"
    assert f"lora_unet_down_blocks_0_{block}_attn1_to_q.lora_down.weight" in twin
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in twin
    converted = to_kohya(tensors, metadata)
    assert converted.keys() == twin.keys()
    assert all(torch.equal(converted[k], twin[k]) for k in twin)
    path = write_lora(tmp_path / "kohya.safetensors", twin)

    a, b = ours(ref_dir), ours(ref_dir)
    load_lora(a, trained, scale=0.7)
    load_lora(b, path, scale=0.7)
    assert not changed(weights(a), weights(b))  # same factors, same alpha / r: same bits

    theirs.load_lora_weights(str(path), adapter_name="kohya")
    theirs.set_adapters(["kohya"], adapter_weights=[0.7])
    reference = theirs(PROMPT, generator=torch.Generator().manual_seed(0), **CALL).images
    theirs.delete_adapters("kohya")
    assert np.abs(reference - image(b)).max() < IMAGE_TOL


def older_diffusers_twin(tensors: dict) -> dict:
    """The same LoRA in diffusers' attention-processor format (no alpha: alpha = r)."""
    out = {}
    for key, value in tensors.items():
        module, _, which = key.rpartition(".lora_")
        end = "down" if which.startswith("A") else "up"
        if module.startswith("unet."):
            parent, _, proj = module.removesuffix(".0").rpartition(".")
            out[f"{parent}.processor.{proj}_lora.{end}.weight"] = value
        else:
            out[f"{module}.lora_linear_layer.{end}.weight"] = value
    return out


def test_older_diffusers_format_loads_to_the_same_weights(ref_dir, trained):
    tensors, _ = read_lora_file(trained)
    older = older_diffusers_twin(tensors)
    block = "unet.mid_block.attentions.0.transformer_blocks.0"
    assert f"{block}.attn2.processor.to_out_lora.up.weight" in older
    a, b = ours(ref_dir), ours(ref_dir)
    load_lora(a, trained, scale=0.7)  # alpha / r = 2 in the file's metadata
    load_lora(b, older, scale=1.4)  # no alpha: 1
    assert not changed(weights(a), weights(b))


def test_fused_qkv_gets_the_same_weights(ref_dir, trained):
    plain, fused = ours(ref_dir), ours(ref_dir)
    fused.unet.fuse_qkv()
    load_lora(plain, trained)
    load_lora(fused, trained)
    fused.unet.unfuse_qkv()
    assert not changed(weights(plain), weights(fused))


# ---- errors ----


def test_bad_loras_raise_and_leave_the_weights_alone(ref_dir, trained, tmp_path):
    pipe = ours(ref_dir)
    before = weights(pipe)
    tensors, metadata = read_lora_file(trained)
    with pytest.raises(ValueError, match="not found in this model"):
        load_lora(
            pipe,
            {
                "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.ones(2, 4),
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(4, 2),
            },
        )
    bad = dict(tensors)
    key = next(k for k in bad if k.endswith("attn2.to_k.lora_A.weight"))
    bad[key] = torch.ones(4, 7)  # every shape is checked before any weight is merged
    with pytest.raises(ValueError, match="do not fit a weight"):
        load_lora(pipe, bad)
    with pytest.raises(ValueError, match="dora_scale is not supported"):
        load_lora(pipe, {**tensors, "unet.mid.dora_scale": torch.ones(1)})
    with pytest.raises(ValueError, match="needs both"):
        load_lora(pipe, {k: v for k, v in tensors.items() if "lora_B" not in k})
    with pytest.raises(ValueError, match="SDXL"):
        load_lora(pipe, {"lora_te2_text_model_x.lora_down.weight": torch.ones(1, 1)})
    assert not changed(before, weights(pipe)) and active_loras(pipe) == {}
    load_lora(pipe, trained, adapter_name="x")
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(pipe, trained, adapter_name="x")
    with pytest.raises(ValueError, match="is not loaded"):
        unload_lora(pipe, "y")
    with pytest.raises(FileNotFoundError):
        load_lora(pipe, tmp_path / "missing")


def test_lora_flags_are_checked(ref_dir, data_dir, tmp_path, capsys):
    assert train_lora(ref_dir, data_dir, tmp_path, "--lora-rank", "0") == 2
    assert "lora_rank=0" in capsys.readouterr().err
