"""The embedded default model: offline `ldm generate` end to end, and its size budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    assert image.size == (64, 64)
    pixels = np.asarray(image, dtype=np.float32) / 255
    assert pixels.std() > 0.05  # not a blank or black image
