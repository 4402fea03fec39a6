"""Score a shapes-model pipeline folder under several sampling settings (train/evaluate.py).

Every combination of --sampler, --steps, --guidance and --rescale is scored on the same prompts
and seeds: the held-out prompts (`train.shapes.heldout_prompts`, what `ldm train-default
--stages eval` scores) or, with --split train, prompts drawn like the training captions. One
printed line per setting: accuracy per attribute, binding and "overall" (every claim right).

--checkpoint scores a training checkpoint instead: its EMA weights (`ldm train` keeps them with
--ema-decay; else its last trained ones) put into --model's modules, --model being the folder
that run started from.

--padding empty replaces each prompt's outputs after its EOS by the empty prompt's (the words
and the EOS kept): how much the U-Net reads the caption from the padding positions.

    python bench/default_model_eval.py [--model FOLDER] [--n 100] [--split heldout|train]
        [--prompt-seed 0] [--sampler dpmpp_2m ...] [--steps 10 ...] [--guidance 4 ...]
        [--rescale 0 ...] [--checkpoint RUN/checkpoints/checkpoint-N]
        [--padding keep|empty] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from pipelines import TextToImagePipeline
from text_encoder.clip_model import eos_positions
from train.evaluate import evaluate
from train.loop import load_trained_weights
from train.shapes import describe, heldout_prompts, sample_scene


def prompts_for(split: str, n: int, seed: int = 0) -> list:
    if split == "heldout":
        return heldout_prompts(n, seed=seed)
    rng = np.random.default_rng([seed, 777])
    return [describe(sample_scene(rng, split="train"), rng) for _ in range(n)]


def empty_padding(pipe: TextToImagePipeline) -> None:
    """Make pipe's prompt contexts keep only the words and the EOS of the prompt (needs CFG)."""
    encode = pipe.encode_prompt
    eos_id = pipe.text_encoder.model.config.eos_token_id

    def encode_prompt(prompt, negative_prompt, num_images_per_prompt, do_cfg, clip_skip=None):
        if not do_cfg or negative_prompt is not None or num_images_per_prompt != 1:
            raise ValueError("--padding empty needs guidance > 1, no negative prompt, one image")
        cond, uncond = encode(prompt, negative_prompt, num_images_per_prompt, do_cfg, clip_skip)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        ids = pipe.text_encoder.tokenize(prompts, long_prompt="truncate", weighting=False).ids
        after = torch.arange(ids.shape[1])[None, :] > eos_positions(ids, eos_id)[:, None]
        after = after[:, :, None].to(cond.device)  # uncond is "": its padding is caption-free
        return torch.where(after, uncond, cond), uncond

    pipe.encode_prompt = encode_prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--n", type=int, default=100, help="prompts (seeds 0..n-1)")
    p.add_argument(
        "--prompt-seed",
        type=int,
        default=0,
        help="which prompts (default 0: the ones `ldm train-default` scores; another: a fresh set)",
    )
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"])
    p.add_argument("--steps", type=int, nargs="+", default=[10])
    p.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    p.add_argument("--rescale", type=float, nargs="+", default=[0.0])
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a training checkpoint of --model: score its EMA (else last) weights",
    )
    p.add_argument("--padding", choices=("keep", "empty"), default="keep")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    pipe.progress = False
    if args.checkpoint:
        load_trained_weights(pipe, args.checkpoint)
    if args.padding == "empty":
        empty_padding(pipe)
    prompts = prompts_for(args.split, args.n, args.prompt_seed)
    seeds = list(range(len(prompts)))
    settings = itertools.product(args.sampler, args.steps, args.guidance, args.rescale)
    for sampler, steps, guidance, rescale in settings:
        start = time.perf_counter()

        def generate(texts, seeds_, sampler=sampler, steps=steps, g=guidance, r=rescale):
            generators = [torch.Generator().manual_seed(s) for s in seeds_]
            return pipe(texts, num_inference_steps=steps, guidance_scale=g, guidance_rescale=r,
                        sampler=sampler, output_type="np", generator=generators).images  # fmt: skip

        result = evaluate(generate, prompts, seeds)
        scores = {k: round(100 * v, 1) for k, v in result.items() if not k.startswith("n_")}
        print(f"{args.split} n={len(prompts)} prompt-seed={args.prompt_seed} {sampler} "
              f"steps={steps} guidance={guidance} rescale={rescale} padding={args.padding}: "
              f"{scores} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
