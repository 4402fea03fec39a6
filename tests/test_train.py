"""`ldm train` and `ldm train-vae` end to end, on tiny random models and 32x32 images.

Covers: a short fine-tune lowers the loss on held-out pairs and its folder loads in our
pipeline and in diffusers; bitwise-exact resume; two processes through `accelerate launch`;
a SIGKILL while a checkpoint is written; a NaN loss; bad data and flags; from-scratch training
with an autoencoder from `ldm train-vae`.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from train.checkpoint import list_checkpoints, load_checkpoint, resolve_resume
from train.data import DataConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared, busy machine OpenMP threads spin-waiting for each other made these tiny
    # models ~50x slower (4 s instead of 0.05 s for 8 small forwards); one thread is fastest.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pipeline(seed: int = 0):
    """A random tiny pipeline: 2-level U-Net, f=8 autoencoder, 2-layer 32-wide CLIP text model."""
    from autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
    from ldm.schedule import ScheduleConfig
    from ldm.unet import UNET_PRESETS, UNet
    from pipelines import TextToImagePipeline
    from text_encoder import CLIP_TEXT_PRESETS, ClipTextEncoder, ClipTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(replace(AUTOENCODER_PRESETS["tiny"], sample_size=32))
    unet = UNet(replace(UNET_PRESETS["tiny"], sample_size=4))
    encoder = ClipTextEncoder(ClipTextModel(CLIP_TEXT_PRESETS["tiny"]))
    return TextToImagePipeline(unet, vae, encoder, ScheduleConfig(), "ddim")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipe")
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    """(train folder of 24 captioned shapes, a held-out folder of 8 other images)."""
    from train.shapes import make_dataset

    root = tmp_path_factory.mktemp("shapes")
    return (make_dataset(root / "train", 24, seed=0, size=32),
            make_dataset(root / "heldout", 8, seed=1, size=32))  # fmt: skip


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> Path:
    """10 non-square noise images (random crops differ) with captions in metadata.csv."""
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    lines = ["file_name,text"]
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (32, 44, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,noise number {i} on the left")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def config(pipe_dir, data, output, **overrides):
    from train.loop import RunConfig, TrainConfig

    run_keys = set(RunConfig.__dataclass_fields__)
    run = {k: overrides.pop(k) for k in list(overrides) if k in run_keys}
    data_keys = set(DataConfig.__dataclass_fields__)
    data_cfg = {k: overrides.pop(k) for k in list(overrides) if k in data_keys}
    run = RunConfig(output=str(output), **{"checkpoint_every": 1000, "progress": False, **run})
    data_cfg = DataConfig(str(data), **{"resolution": 32, **data_cfg})
    return TrainConfig(model=str(pipe_dir), data=data_cfg, run=run, **overrides)


def heldout_pairs(folder: Path):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, [r["text"] for r in rows]


# ---- fine-tuning ----


def test_finetune_lowers_heldout_loss_and_loads_in_ours_and_diffusers(pipe_dir, shapes, tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines import TextToImagePipeline
    from train.loop import fixed_noise_loss, train

    pixels, captions = heldout_pairs(shapes[1])
    before = fixed_noise_loss(TextToImagePipeline.from_pretrained(pipe_dir).components(), pixels,
                              captions)  # fmt: skip
    cfg = config(pipe_dir, shapes[0], tmp_path / "out", max_steps=10, batch_size=8,
                 learning_rate=2e-3, caption_dropout=0.1, validation_prompts=("a red circle",),
                 validation_every=10, validation_steps=2)  # fmt: skip
    out = train(cfg)
    ours = TextToImagePipeline.from_pretrained(out)
    after = fixed_noise_loss(ours.components(), pixels, captions)
    # same t and noise for both; the untrained model scores ~1.1 (random output), so a drop
    # below 0.7 means it learnt the data, not just to output zeros (which scores ~1.0); three
    # seeds gave 0.45-0.53
    assert after < 0.7 * before, (before, after)
    assert Image.open(out / "validation" / "step-00000010.png").size == (64, 32)

    theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        a = ours.unet(x, t, context)
        b = theirs.unet(x, t, encoder_hidden_states=context).sample
    # the same weights through two float32 implementations: summation-order rounding only
    assert (a - b).abs().max() < 1e-5


def test_text_encoder_learning_rate_is_its_own(pipe_dir, noise_folder, tmp_path):
    """--text-encoder-learning-rate: the text encoder's AdamW group has its own LR (a tiny one
    leaves it as it was while the U-Net trains at the run's LR); without it, one LR for both."""
    import train.loop as loop

    def weights(folder, part):
        name = "model" if part == "text_encoder" else "diffusion_pytorch_model"
        return load_file(folder / part / f"{name}.safetensors")

    kw = dict(max_steps=2, batch_size=2, learning_rate=1e-2, train_text_encoder=True)
    loop.train(config(pipe_dir, noise_folder, tmp_path / "apart", text_encoder_learning_rate=1e-30,
                      **kw))  # fmt: skip
    loop.train(config(pipe_dir, noise_folder, tmp_path / "same", **kw))
    before = {part: weights(pipe_dir, part) for part in ("unet", "text_encoder")}
    moved = {}
    for run in ("apart", "same"):
        after = {part: weights(tmp_path / run, part) for part in ("unet", "text_encoder")}
        moved[run] = {part: max((v - before[part][k]).abs().max().item() for k, v in w.items())
                      for part, w in after.items()}  # fmt: skip
    assert moved["apart"]["unet"] > 1e-4 and moved["same"]["unet"] > 1e-4
    # two AdamW steps move a weight by at most ~2 x its LR (zero-initialised biases show it)
    assert moved["apart"]["text_encoder"] < 1e-28 < 1e-4 < moved["same"]["text_encoder"]
    with pytest.raises(ValueError, match="text_encoder_learning_rate=1e-05 must be > 0 and needs"):
        config(pipe_dir, noise_folder, tmp_path / "bad", text_encoder_learning_rate=1e-5)
    with pytest.raises(ValueError, match="text_encoder_learning_rate=0.0"):
        config(pipe_dir, noise_folder, tmp_path / "bad", train_text_encoder=True,
               text_encoder_learning_rate=0.0)  # fmt: skip


def test_grounding_loss_trains_logs_and_refuses_other_data(
    pipe_dir, shapes, noise_folder, tmp_path
):
    """--grounding-weight on a shapes folder: the run logs both terms, in [0, 1], and the loss
    reaches the weights (the same seed without it ends elsewhere); other data and bad settings
    are refused with the setting's name."""
    import csv

    import train.loop as loop

    kw = dict(max_steps=3, batch_size=4, learning_rate=1e-3, train_text_encoder=True,
              report_to="csv", log_every=1, grounding_t_max=1000)  # fmt: skip
    unets, logged = {}, {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight:g}"
        loop.train(config(pipe_dir, shapes[0], out, grounding_weight=weight, **kw))
        unets[weight] = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        with open(out / "logs" / "metrics.csv") as f:
            logged[weight] = [(row["name"], float(row["value"])) for row in csv.DictReader(f)]
    terms = [(n, v) for n, v in logged[1.0] if n.startswith("grounding_")]
    assert {n for n, _ in terms} == {"grounding_own", "grounding_leak"}
    assert all(0.0 < v <= 1.0 for _, v in terms), terms
    assert not any(n.startswith("grounding_") for n, _ in logged[0.0])
    assert any(not torch.equal(v, unets[1.0][k]) for k, v in unets[0.0].items())
    with pytest.raises(ValueError, match="made by train.shapes"):
        loop.train(config(pipe_dir, noise_folder, tmp_path / "noise", max_steps=1,
                          grounding_weight=1.0))  # fmt: skip
    with pytest.raises(ValueError, match="grounding_weight=-1"):
        config(pipe_dir, shapes[0], tmp_path / "bad", grounding_weight=-1)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        config(pipe_dir, shapes[0], tmp_path / "bad", grounding_weight=1.0,
               gradient_checkpointing=True)  # fmt: skip


def test_segmentation_loss_trains_logs_resumes_and_refuses_other_data(
    pipe_dir, shapes, noise_folder, tmp_path
):
    """--segmentation-weight on a shapes folder: the run logs the loss, the head trains (its
    loss falls), reaches the U-Net (the same seed without it ends elsewhere), is kept in the
    checkpoints and not in the saved pipeline; other data and bad settings are refused."""
    import csv

    import train.loop as loop

    kw = dict(batch_size=4, learning_rate=3e-3, report_to="csv", log_every=1,
              grounding_t_max=1000, checkpoint_every=10, ema_decay=0.9)  # fmt: skip
    unets, logged = {}, {}
    for weight, steps in ((0.0, 3), (1.0, 3), (1.0, 20)):
        out = tmp_path / f"w{weight:g}-{steps}"
        loop.train(config(pipe_dir, shapes[0], out, segmentation_weight=weight, max_steps=steps,
                          **kw))  # fmt: skip
        unets[weight, steps] = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        with open(out / "logs" / "metrics.csv") as f:
            logged[weight, steps] = [(r["name"], float(r["value"])) for r in csv.DictReader(f)]
    seg = [v for n, v in logged[1.0, 20] if n == "segmentation"]
    assert len(seg) == 20 and 0.0 < min(seg)
    assert np.mean(seg[-5:]) < 0.8 * np.mean(seg[:5]), seg  # the head and features learn
    assert not any(n == "segmentation" for n, _ in logged[0.0, 3])
    assert any(not torch.equal(v, unets[1.0, 3][k]) for k, v in unets[0.0, 3].items())
    assert unets[1.0, 3].keys() == unets[0.0, 3].keys()  # the head is not in the pipeline
    tensors, _ = load_checkpoint(tmp_path / "w1-20" / "checkpoints" / "checkpoint-00000020")
    assert set(tensors["segmentation"]) == {"head.weight", "head.bias"}
    assert any(k.startswith("segmentation.") for k in tensors["ema"])
    # resumed from step 10 (head, EMA and optimizer restored): the same weights at 20
    import shutil

    again = tmp_path / "resumed"
    shutil.copytree(tmp_path / "w1-20" / "checkpoints" / "checkpoint-00000010",
                    again / "checkpoints" / "checkpoint-00000010")  # fmt: skip
    loop.train(config(pipe_dir, shapes[0], again, segmentation_weight=1.0, max_steps=20,
                      resume="latest", **kw))  # fmt: skip
    resumed = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, unets[1.0, 20][k]) for k, v in resumed.items())
    with pytest.raises(ValueError, match="made by train.shapes"):
        loop.train(config(pipe_dir, noise_folder, tmp_path / "noise", max_steps=1,
                          segmentation_weight=1.0))  # fmt: skip
    with pytest.raises(ValueError, match="segmentation_weight=-1"):
        config(pipe_dir, shapes[0], tmp_path / "bad", segmentation_weight=-1)
    with pytest.raises(ValueError, match="lora_rank"):
        config(pipe_dir, shapes[0], tmp_path / "bad", segmentation_weight=1.0, lora_rank=4)


# ---- exact resume ----


class Interrupt(Exception):
    pass


def test_resume_is_bitwise_exact_mid_epoch(pipe_dir, noise_folder, tmp_path, monkeypatch):
    import train.loop as loop

    kw = dict(max_steps=4, batch_size=3, gradient_accumulation_steps=2, learning_rate=1e-3,
              lr_scheduler="cosine", lr_warmup_steps=2, crop="random", random_flip=True,
              caption_dropout=0.3, offset_noise=0.1, snr_gamma=5.0, ema_decay=0.9,
              prediction_type="v_prediction", train_text_encoder=True,
              checkpoint_every=2)  # fmt: skip
    loop.train(config(pipe_dir, noise_folder, tmp_path / "full", **kw))

    original = loop.write_checkpoint

    def stop_after_step_2(*args, **kwargs):
        path = original(*args, **kwargs)
        if path.name.endswith("02"):  # 2 steps x 6 images: mid-way through the 2nd epoch
            raise Interrupt
        return path

    monkeypatch.setattr(loop, "write_checkpoint", stop_after_step_2)
    with pytest.raises(Interrupt):
        loop.train(config(pipe_dir, noise_folder, tmp_path / "split", **kw))
    monkeypatch.setattr(loop, "write_checkpoint", original)
    loop.train(config(pipe_dir, noise_folder, tmp_path / "split", resume="latest", **kw))

    full, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "checkpoint-00000004")
    split, state = load_checkpoint(tmp_path / "split" / "checkpoints" / "checkpoint-00000004")
    assert set(full) == {"unet", "text_encoder", "ema"} == set(split)
    for group in full:
        for name, tensor in full[group].items():
            assert torch.equal(tensor, split[group][name]), f"{group}/{name} differs"
    assert state["ema_updates"] == 4
    saved = [(tmp_path / run / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
             for run in ("full", "split")]  # fmt: skip
    assert saved[0] == saved[1]
    # the saved pipeline holds the EMA weights, not the last trained ones
    unet = load_file(tmp_path / "split" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, split["ema"][f"unet.{k}"]) for k, v in unet.items())
    assert not all(torch.equal(v, split["unet"][k]) for k, v in unet.items())


def test_a_checkpoints_weights_load_into_a_pipeline(pipe_dir, noise_folder, tmp_path):
    """load_trained_weights: a checkpoint's EMA shadows (default) or its last trained weights
    into a pipeline made from the run's --model; at the last step they are the saved folder's."""
    import train.loop as loop
    from pipelines import TextToImagePipeline

    kw = dict(max_steps=2, batch_size=2, learning_rate=1e-2, ema_decay=0.9, checkpoint_every=2)
    loop.train(config(pipe_dir, noise_folder, tmp_path / "run", train_text_encoder=True, **kw))
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-00000002"
    saved = TextToImagePipeline.from_pretrained(tmp_path / "run")
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    assert loop.load_trained_weights(pipe, checkpoint) == ["unet", "text_encoder"]
    for part in ("unet", "text_encoder"):
        ours, theirs = (p.unet.state_dict() if part == "unet" else p.text_encoder.model.state_dict()
                        for p in (pipe, saved))  # fmt: skip
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items()), part
    tensors, _ = load_checkpoint(checkpoint)
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    loop.load_trained_weights(pipe, checkpoint, ema=False)
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in tensors["unet"].items())
    assert not all(torch.equal(unet[k], v) for k, v in saved.unet.state_dict().items())

    loop.train(config(pipe_dir, noise_folder, tmp_path / "lora", lora_rank=2, **kw))
    with pytest.raises(ValueError, match="is from a LoRA run"):
        loop.load_trained_weights(pipe, tmp_path / "lora" / "checkpoints" / "checkpoint-00000002")
    with pytest.raises(ValueError, match="incomplete or damaged"):
        loop.load_trained_weights(pipe, tmp_path / "nothing-here")


# ---- processes ----


def test_two_processes_through_accelerate_launch(pipe_dir, shapes, tmp_path):
    # accelerate 1.x's `launch --cpu` starts one process (it needs MPI for more); `--multi_gpu`
    # starts two through torchrun, and train.loop asks accelerate for CPU training (gloo).
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ldm_cli", "train", "--model", str(pipe_dir), "--data", str(shapes[0]),
           "--output", str(out), "--resolution", "32", "--max-steps", "2", "--batch-size", "2",
           "--ema-decay", "0.9", "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, state = load_checkpoint(resolve_resume(out, "latest"))
    assert state["num_processes"] == 2 and len(state["rng"]) == 2
    from pipelines import TextToImagePipeline

    TextToImagePipeline.from_pretrained(out)


KILLABLE = textwrap.dedent("""
    import sys, time
    import train.checkpoint as checkpoint

    write = checkpoint._write_files

    def slow(folder, tensors, state):  # the files of step 4 are written, then the writer hangs
        write(folder, tensors, state)
        if state["step"] == 4:
            print("WRITING", flush=True)
            time.sleep(600)

    checkpoint._write_files = slow
    from train.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(pipe_dir, shapes, tmp_path):
    from train.loop import train

    out = tmp_path / "out"
    args = ["--model", str(pipe_dir), "--data", str(shapes[0]), "--output", str(out),
            "--resolution", "32", "--max-steps", "4", "--batch-size", "2",
            "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *args], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        line = proc.stdout.readline()
        if line.strip() != "WRITING":
            proc.kill()
            pytest.fail((tmp_path / "stderr.txt").read_text()[-3000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000002"]
    assert any(p.name.startswith(".tmp-checkpoint-00000004") for p in root.iterdir())
    assert resolve_resume(out, "latest").name == "checkpoint-00000002"
    train(config(pipe_dir, shapes[0], out, max_steps=4, batch_size=2, checkpoint_every=2,
                 resume="latest"))  # fmt: skip
    assert [p.name for p in root.iterdir()] == ["checkpoint-00000002", "checkpoint-00000004"] or (
        sorted(p.name for p in root.iterdir()) == ["checkpoint-00000002", "checkpoint-00000004"]
    )


# ---- failures ----


def test_nan_loss_stops_with_a_clear_message_and_the_last_checkpoint_intact(
    pipe_dir, shapes, tmp_path, monkeypatch, capsys
):
    import train.loop as loop
    from train.cli import main

    calls = {"n": 0}
    target = loop.training_target

    def poisoned(*args, **kwargs):  # the 4th step's target is NaN
        calls["n"] += 1
        value = target(*args, **kwargs)
        return value * float("nan") if calls["n"] >= 4 else value

    monkeypatch.setattr(loop, "training_target", poisoned)
    out = tmp_path / "out"
    status = main(["--model", str(pipe_dir), "--data", str(shapes[0]), "--output", str(out),
                   "--resolution", "32", "--max-steps", "6", "--batch-size", "2",
                   "--checkpoint-every", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 1
    assert "loss became nan at step 4" in err and "last checkpoint" in err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000002"]
    load_checkpoint(out / "checkpoints" / "checkpoint-00000002")
    assert not (out / "model_index.json").exists()


def test_bad_data_and_flags_give_clear_errors(pipe_dir, shapes, tmp_path, capsys):
    from train.cli import main

    base = ["--model", str(pipe_dir), "--output", str(tmp_path / "out"), "--resolution", "32"]
    (tmp_path / "empty").mkdir()
    assert main([*base, "--data", str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main([*base, "--data", str(shapes[0]), "--caption-column", "prompt"]) == 2
    assert "no column 'prompt'" in capsys.readouterr().err
    assert main(["--model", "preset:huge", "--data", str(shapes[0]), "--output", "x"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["--model", "preset:tiny", "--data", str(shapes[0]), "--output", "x"]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main([*base, "--data", str(shapes[0]), "--zero-terminal-snr"]) == 2
    err = capsys.readouterr().err
    assert "--zero-terminal-snr needs --prediction-type v_prediction" in err
    from accelerate.utils import is_tensorboard_available

    if not is_tensorboard_available():
        assert main([*base, "--data", str(shapes[0]), "--report-to", "tensorboard"]) == 2
        assert "pip install tensorboard" in capsys.readouterr().err


def test_zero_terminal_snr_fine_tune_saves_a_schedule_diffusers_reads(pipe_dir, shapes, tmp_path):
    from diffusers import DDIMScheduler

    from ldm.schedule import alphas_cumprod
    from pipelines import TextToImagePipeline
    from train.loop import train

    out = train(config(pipe_dir, shapes[0], tmp_path / "out", max_steps=1, batch_size=2,
                       prediction_type="v_prediction", zero_terminal_snr=True))  # fmt: skip
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    assert saved["rescale_betas_zero_snr"] is True and saved["timestep_spacing"] == "trailing"
    schedule = TextToImagePipeline.from_pretrained(out).schedule
    ours = alphas_cumprod(schedule)
    theirs = DDIMScheduler.from_pretrained(out, subfolder="scheduler").alphas_cumprod
    assert ours[-1] == 0 and theirs[-1] == 0  # t = T is pure noise: the zero terminal SNR
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # rescaled, not replaced (Lin et al., Algorithm 1): sqrt(alpha_bar) is shifted and scaled
    # so that its first value stays and its last becomes 0; every value between drops
    before = alphas_cumprod(TextToImagePipeline.from_pretrained(pipe_dir).schedule)
    assert before[-1] > 1e-3 and torch.isclose(ours[0], before[0], rtol=1e-6, atol=0)
    assert (ours[1:-1] < before[1:-1]).all()


def test_help_documents_every_flag():
    from train.cli import build_parser

    text = build_parser().format_help()
    flags = """--model --data --output --vae --prediction-type --snr-gamma --offset-noise
        --zero-terminal-snr
        --caption-dropout --ema-decay --train-text-encoder --text-encoder-learning-rate
        --max-steps --batch-size --resolution
        --learning-rate --lr-scheduler --lr-warmup-steps --checkpoint-every
        --checkpoints-total-limit --resume --seed --mixed-precision --gradient-accumulation-steps
        --gradient-checkpointing --image-column --caption-column --validation-prompt
        --validation-every --num-workers --center-crop --random-crop --random-flip --report-to
        --strict --text-encoder --grounding-weight --grounding-t-max""".split()
    assert not [f for f in flags if f not in text]


# ---- from scratch ----


def test_train_vae_then_a_model_from_scratch(shapes, tmp_path, capsys):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from pipelines import TextToImagePipeline
    from train.cli import main as train_main
    from train.cli_vae import main as train_vae_main

    vae = tmp_path / "vae"
    common = ["--data", str(shapes[0]), "--resolution", "32", "--batch-size", "2",
              "--no-progress", "--learning-rate", "1e-3"]  # fmt: skip
    status = train_vae_main(["--model", "preset:tiny", "--output", str(vae), "--max-steps", "3",
                             "--disc-start", "1", "--validation-images", "2", *common])  # fmt: skip
    assert status == 0
    saved = json.loads((vae / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKL" and saved["scaling_factor"] != 0.18215
    assert (vae / "validation" / "step-00000003.png").is_file()
    DiffusersAutoencoderKL.from_pretrained(vae)

    model = tmp_path / "model"
    status = train_main(["--model", "preset:tiny", "--vae", str(vae), "--output", str(model),
                         "--max-steps", "2", "--gradient-checkpointing", *common])  # fmt: skip
    assert status == 0
    pipe = TextToImagePipeline.from_pretrained(model)
    assert pipe.vae.config.scaling_factor == saved["scaling_factor"]
    assert pipe.unet.config.sample_size == 4 and pipe.text_encoder.model.config.hidden_size == 32

    # a contrastively pretrained text encoder (`ldm train-text`), kept frozen by `ldm train`
    from safetensors.torch import load_file

    from ldm_cli import main as ldm

    text = tmp_path / "text"
    status = ldm(["train-text", "--data", str(shapes[0]), "--heldout", str(shapes[1]),
                  "--output", str(text), "--width", "32", "--layers", "2", "--heads", "2",
                  "--resolution", "32", "--steps", "3", "--batch-size", "8"])  # fmt: skip
    assert status == 0
    scores = json.loads((text / "pretrain_eval.json").read_text())
    assert set(scores) == {"shape", "colour", "flip"} and all(0 <= v <= 1 for v in scores.values())
    model2 = tmp_path / "model2"
    status = train_main(["--model", "preset:tiny", "--vae", str(vae), "--text-encoder", str(text),
                         "--output", str(model2), "--max-steps", "2", *common])  # fmt: skip
    assert status == 0
    pretrained, saved_text = (load_file(text / "model.safetensors"),
                              load_file(model2 / "text_encoder" / "model.safetensors"))  # fmt: skip
    assert pretrained.keys() == saved_text.keys()
    assert all(torch.equal(pretrained[k], saved_text[k]) for k in pretrained)  # frozen
    wide = tmp_path / "wide"
    status = ldm(["train-text", "--data", str(shapes[0]), "--output", str(wide), "--width", "48",
                  "--layers", "1", "--heads", "2", "--resolution", "32", "--steps", "1",
                  "--batch-size", "4"])  # fmt: skip
    assert status == 0
    capsys.readouterr()
    status = train_main(["--model", "preset:tiny", "--vae", str(vae), "--text-encoder", str(wide),
                         "--output", str(tmp_path / "m3"), "--max-steps", "1",
                         *common])  # fmt: skip
    assert status != 0
    assert "--text-encoder" in (err := capsys.readouterr().err) and "width 48" in err
    assert "width 32" in err
    status = train_main(["--model", str(model), "--text-encoder", str(text),
                         "--output", str(tmp_path / "m4"), "--max-steps", "1",
                         *common])  # fmt: skip
    assert status != 0
    assert "--text-encoder: only for training from scratch" in capsys.readouterr().err


def test_decoder_only_fine_tune_keeps_the_latents(shapes, tmp_path, capsys):
    from pipelines.loading import load_vae
    from train.cli_vae import main as train_vae_main

    common = ["--data", str(shapes[0]), "--resolution", "32", "--batch-size", "2",
              "--no-progress", "--learning-rate", "1e-3", "--disc-weight", "0"]  # fmt: skip
    assert train_vae_main(["--model", "preset:tiny", "--output", str(tmp_path / "a"),
                           "--max-steps", "2", *common]) == 0  # fmt: skip
    assert train_vae_main(["--model", str(tmp_path / "a"), "--output", str(tmp_path / "b"),
                           "--max-steps", "2", "--decoder-only", *common]) == 0  # fmt: skip
    a, b = load_vae(tmp_path / "a"), load_vae(tmp_path / "b")
    assert a.config.scaling_factor == b.config.scaling_factor
    sa, sb = a.state_dict(), b.state_dict()
    frozen = [k for k in sa if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in sa if k.startswith("decoder.")]
    assert frozen and all(torch.equal(sa[k], sb[k]) for k in frozen)
    assert any(not torch.equal(sa[k], sb[k]) for k in trained)
    status = train_vae_main(["--model", "preset:tiny", "--output", str(tmp_path / "c"),
                             "--max-steps", "1", "--decoder-only", *common])  # fmt: skip
    assert status == 2 and "--decoder-only fine-tunes an existing" in capsys.readouterr().err
