"""The `ldm` command end to end: generate, replay, convert, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

from tiny import SD_SCHEDULER, save_reference  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("model"), "sd1", SD_SCHEDULER)


def ldm(*args, check=True):
    # block-buffered stdout, as for any user piping the output (the exit must flush it)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "ldm_cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_writes_png_with_parameters_and_replay_is_exact(model, tmp_path):
    out = tmp_path / "img.png"
    run = ldm(
        "generate",
        "a red circle",
        "-m",
        model,
        "-o",
        out,
        "--steps",
        3,
        "--seed",
        7,
        "--negative-prompt",
        "blue",
        "--sampler",
        "euler_ancestral",
        "--quiet",
    )
    # generate leaves without Python's teardown (ldm_cli.run): the piped stdout still arrives
    assert run.stdout.strip() == str(out)
    params = json.loads(Image.open(out).info["ldm:parameters"])
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "blue"
    assert (params["seed"], params["sampler"], params["steps"]) == (7, "euler_ancestral", 3)
    assert (params["height"], params["width"]) == (16, 16) and len(params["model_hash"]) == 64
    assert "Steps: 3, Sampler: euler_ancestral" in Image.open(out).info["parameters"]
    again = tmp_path / "again.png"
    ldm("generate", "--replay", out, "-o", again, "--quiet")
    np.testing.assert_array_equal(pixels(again), pixels(out))


def test_image_of_a_batch_is_remade_alone(model, tmp_path):
    ldm(
        "generate",
        "a blue square",
        "-m",
        model,
        "-o",
        tmp_path / "b.png",
        "--steps",
        2,
        "--count",
        4,
        "--seed",
        10,
        "--quiet",
    )
    ldm(
        "generate",
        "a blue square",
        "-m",
        model,
        "-o",
        tmp_path / "alone.png",
        "--steps",
        2,
        "--seed",
        13,
        "--quiet",
    )
    np.testing.assert_array_equal(pixels(tmp_path / "b-3.png"), pixels(tmp_path / "alone.png"))
    assert not np.array_equal(pixels(tmp_path / "b-2.png"), pixels(tmp_path / "b-3.png"))


def test_generate_does_not_import_the_training_stack(model, tmp_path):
    code = (
        "import sys, ldm_cli; ldm_cli.main(['generate', 'x', '-m', sys.argv[1], '-o', "
        "sys.argv[2], '--steps', '1', '--quiet']); "
        "print(sorted(m for m in ('accelerate', 'datasets', 'peft', 'diffusers', 'train') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model), str(tmp_path / "x.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", "18"], "height=18 must be a positive multiple of 4"),
        (["--steps", "0"], "num_inference_steps=0"),
        (["--sampler", "nope"], "nope"),
        (["--count", "0"], "--count=0"),
    ],
)
def test_bad_arguments_give_one_line_errors(model, tmp_path, args, message):
    out = ldm("generate", "x", "-m", model, "-o", tmp_path / "e.png", *args, check=False)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_missing_model_and_bad_replay_give_one_line_errors(tmp_path):
    out = ldm("generate", "x", "-m", tmp_path / "missing", check=False)
    assert out.returncode != 0 and "no such file or folder" in out.stderr
    assert "Traceback" not in out.stderr
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    out = ldm("generate", "--replay", tmp_path / "plain.png", check=False)
    assert out.returncode != 0 and "ldm:parameters" in out.stderr


def test_convert_round_trip_and_diffusers_reads_our_single_file(model, tmp_path):
    single = tmp_path / "model.safetensors"
    ldm("convert", model, single)
    ldm("convert", single, tmp_path / "back")
    from pipelines import TextToImagePipeline

    a = TextToImagePipeline.from_pretrained(model)
    b = TextToImagePipeline.from_pretrained(tmp_path / "back")
    c = TextToImagePipeline.from_pretrained(single)
    for name in ("unet", "vae"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert sa.keys() == sb.keys() == sc.keys()
        assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]) for k in sa)

    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_single_file(
        str(single),
        config=str(model),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle", num_inference_steps=3, output_type="np", height=16, width=16)
    expected = ref(**call, generator=torch.Generator().manual_seed(0)).images
    c.progress = False
    got = c(**call, sampler="ddim", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(got - expected).max() < 1e-4


def test_corrupt_and_malicious_checkpoints_give_one_line_errors(model, tmp_path):
    good = tmp_path / "good.safetensors"
    ldm("convert", model, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out = ldm("generate", "x", "-m", truncated, "-o", tmp_path / "t.png", check=False)
    assert out.returncode != 0 and "truncated.safetensors" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1

    marker = tmp_path / "pwned"

    class Payload:  # a pickle that would create a file when loaded
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Payload()}}, evil)
    out = ldm("generate", "x", "-m", evil, "-o", tmp_path / "e.png", check=False)
    assert out.returncode != 0 and "evil.ckpt" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()
