"""The embedded default model: offline `ldm generate` end to end, and its size budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.loading import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]


def test_default_model_fits_the_size_budget():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB > 25 MB"


def test_ldm_generate_works_offline_on_the_default_model(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "no-cache"))
    out = tmp_path / "out.png"
    run = subprocess.run(
        [sys.executable, "-m", "ldm_cli", "generate", "a red circle", "-o", str(out), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    image = Image.open(out)
    params = json.loads(image.info["ldm:parameters"])
    assert params["model"] is None and params["prompt"] == "a red circle"
    # the folder's recommended settings, not the CLI's generic ones (7.5 / 50)
    defaults = json.loads((DEFAULT_MODEL / "generation_defaults.json").read_text())
    assert (params["guidance"], params["steps"]) == (
        defaults["guidance_scale"],
        defaults["num_inference_steps"],
    )
    assert image.size == (64, 64)
    pixels = np.asarray(image, dtype=np.float32) / 255
    assert pixels.std() > 0.05  # not a blank or black image


def test_train_default_runs_every_stage_at_a_tiny_size(tmp_path, monkeypatch):
    """The whole recipe (data, two autoencoder passes, text encoder, U-Net frozen then joint,
    then grounded, eval, samples) at toy sizes."""
    from safetensors.torch import load_file

    from train.default_model import DEFAULT_STEPS, main

    work = tmp_path / "work"
    tiny = ["--images", "32", "--vae-steps", "2", "--decoder64-steps", "2", "--text-steps", "2",
            "--unet-steps", "2", "--joint-steps", "2", "--joint-cycles", "2",
            "--grounded-steps", "2", "--batch-size", "4", "--eval-prompts", "4",
            "--text-pad-loss", "0.5", "--text-max-length", "24",
            "--unet-preset", "shapes3", "--segmentation-weight", "0.1"]  # fmt: skip
    assert main(["--work", str(work), *tiny]) == 0
    for folder in ("vae", "vae-ft64"):
        assert (work / folder / "config.json").is_file(), folder
    assert not (work / "vae-ft").exists()  # the crop pass is optional (--decoder-steps)
    # the pipeline decodes with the last (whole-image) decoder, on the base encoder's latents
    name = "diffusion_pytorch_model.safetensors"
    shipped, whole = (
        load_file(work / "pipeline" / "vae" / name),
        load_file(work / "vae-ft64" / name),
    )
    base = load_file(work / "vae" / name)
    assert all(torch.equal(shipped[k], whole[k]) for k in whole)
    assert all(torch.equal(shipped[k], base[k]) for k in base if k.startswith("encoder."))
    assert any(not torch.equal(shipped[k], base[k]) for k in base if k.startswith("decoder."))
    result = json.loads((work / "eval.json").read_text())
    assert result["n_images"] == 4 and 0 < result["psnr"] < 100
    assert (work / "pipeline" / "samples.png").is_file()
    defaults = json.loads((work / "pipeline" / "generation_defaults.json").read_text())
    assert defaults["num_inference_steps"] == DEFAULT_STEPS
    # the text encoder is stored in float16 and loads back in float32 (our loader, transformers')
    text = work / "pipeline" / "text_encoder"
    assert {v.dtype for v in load_file(text / "model.safetensors").values()} == {torch.float16}
    from transformers import CLIPTextModel

    from text_encoder import ClipTextModel

    assert next(ClipTextModel.from_pretrained(text).parameters()).dtype == torch.float32
    assert CLIPTextModel.from_pretrained(text).dtype == torch.float32
    # ... the contrastively pretrained one, frozen in the first U-Net stage, then trained on
    # together with the U-Net from that stage's weights
    pretrained = load_file(work / "text_encoder" / "model.safetensors")
    frozen = load_file(work / "pipeline-frozen" / "text_encoder" / "model.safetensors")
    stored = load_file(text / "model.safetensors")
    assert pretrained.keys() == frozen.keys() == stored.keys()
    assert all(torch.equal(frozen[k], pretrained[k]) for k in pretrained)
    assert not all(torch.equal(stored[k], pretrained[k].half()) for k in pretrained)
    unet_name = "unet/diffusion_pytorch_model.safetensors"
    first = load_file(work / "pipeline-frozen" / unet_name)
    last = load_file(work / "pipeline" / unet_name)
    assert not all(torch.equal(first[k], last[k]) for k in first)
    # --joint-cycles 2: the second cycle starts from the first's finished pipeline
    between = load_file(work / "pipeline-joint1" / unet_name)
    assert not all(torch.equal(between[k], first[k]) for k in first)
    assert not all(torch.equal(between[k], last[k]) for k in first)
    between_text = load_file(work / "pipeline-joint1" / "text_encoder" / "model.safetensors")
    assert {v.dtype for v in between_text.values()} == {torch.float16}
    assert not all(torch.equal(between_text[k], stored[k]) for k in stored)
    # --grounded-steps: one more cycle, from the last joint cycle's pipeline, with the
    # grounding loss (its terms are logged)
    joint2 = load_file(work / "pipeline-joint2" / unet_name)
    assert not all(torch.equal(joint2[k], last[k]) for k in first)
    metrics = (work / "pipeline" / "logs" / "metrics.csv").read_text()
    assert "grounding_own" in metrics and "grounding_leak" in metrics
    # --segmentation-weight: the frozen stage's loss only
    assert ",segmentation," in (work / "pipeline-frozen" / "logs" / "metrics.csv").read_text()
    assert ",segmentation," not in metrics
    assert "grounding_" not in (work / "pipeline-joint2" / "logs" / "metrics.csv").read_text()
    card = (work / "pipeline" / "README.md").read_text()
    assert "joint_steps" in card and "joint_cycles" in card and "grounding_weight" in card
    assert "segmentation_weight" in card
    assert json.loads((work / "text_encoder" / "pretrain_eval.json").read_text())
    assert "text_encoder_pad_loss" in (work / "pipeline" / "README.md").read_text()
    # --text-max-length: the prompt is padded to 24 positions, in our loader and in diffusers'
    tokenizer = json.loads((work / "pipeline" / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 24
    assert json.loads((text / "config.json").read_text())["max_position_embeddings"] == 24
    unet = json.loads((work / "pipeline" / "unet" / "config.json").read_text())
    assert unet["only_cross_attention"] == [True, False, False]  # --unet-preset shapes3
    # v-prediction on a zero-terminal-SNR schedule, sampled from t = T
    schedule = json.loads((work / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert schedule["prediction_type"] == "v_prediction"
    assert schedule["rescale_betas_zero_snr"] and schedule["timestep_spacing"] == "trailing"

    # --install copies the model, not the run's checkpoints, logs or latent cache
    assert (work / "pipeline" / "checkpoints").is_dir() and (work / "pipeline" / "logs").is_dir()
    assert (work / "pipeline-frozen" / "cache").is_dir()  # the joint stage reads its latents
    import pipelines.loading

    monkeypatch.setattr(pipelines.loading, "DEFAULT_MODEL", tmp_path / "installed")
    from train.default_model import install

    installed = install(work)
    assert (installed / "model_index.json").is_file() and (installed / "samples.png").is_file()
    assert not {"cache", "checkpoints", "logs"} & {p.name for p in installed.iterdir()}


def test_train_default_rejects_a_bad_joint_cycle_count(tmp_path):
    from train.default_model import main

    with pytest.raises(SystemExit, match="--joint-cycles: must be >= 0, got -1"):
        main(["--work", str(tmp_path / "work"), "--joint-cycles", "-1"])
    with pytest.raises(SystemExit, match="--joint-cycles 0 .* --grounded-steps is 0"):
        main(["--work", str(tmp_path / "work"), "--joint-cycles", "0", "--grounded-steps", "0"])
    assert not (tmp_path / "work" / "shapes-train").exists()  # refused before any stage ran


def test_train_default_with_no_plain_joint_cycle_runs_only_the_grounded_one(tmp_path, monkeypatch):
    """--joint-cycles 0: the grounded cycle starts from the frozen stage and writes pipeline."""
    import train.default_model as dm

    calls = []
    monkeypatch.setattr(
        dm, "_joint_cycle", lambda work, start, out, *rest: calls.append((start, out, rest))
    )
    work = tmp_path / "work"
    args = dm.build_parser().parse_args(
        ["--work", str(work), "--joint-cycles", "0", "--grounded-steps", "7",
         "--grounded-learning-rate", "2.5e-4"]
    )  # fmt: skip
    dm.stage_joint(work, args)
    assert len(calls) == 1
    start, out, (cache, seed, steps, lr, warmup, extra, _) = calls[0]
    assert (start, out, cache) == (work / "pipeline-frozen", work / "pipeline", start / "cache")
    assert (seed, steps, lr, warmup) == (1, 7, 2.5e-4, 100)
    assert extra == ["--grounding-weight", "0.05"]
