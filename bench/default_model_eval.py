"""Score a shapes-model pipeline folder under several sampling settings (train/evaluate.py).

Every combination of --sampler, --steps, --guidance and --rescale is scored on the same prompts
and seeds: the held-out prompts (`train.shapes.heldout_prompts`, what `ldm train-default
--stages eval` scores) or, with --split train, prompts drawn like the training captions. One
printed line per setting: accuracy per attribute, binding and "overall" (every claim right).

--checkpoint scores a training checkpoint instead: its EMA weights (`ldm train` keeps them with
--ema-decay; else its last trained ones) put into --model's modules, --model being the folder
that run started from; with --no-ema, its last trained weights even when it kept an EMA.

--misses also prints where colour fails: misses on one- and two-object prompts, how many took
the other object's colour, and the commonest (named, drawn) colour pairs.

--prompt-seed takes several sets: each is scored, then their mean (per claim) is printed.
--steps and --guidance default to the model folder's generation_defaults.json (else the
pipeline's own defaults).

--padding empty replaces each prompt's outputs after its EOS by the empty prompt's (the words
and the EOS kept): how much the U-Net reads the caption from the padding positions.

    python bench/default_model_eval.py [--model FOLDER] [--n 100] [--split heldout|train]
        [--prompt-seed 0 ...] [--sampler dpmpp_2m ...] [--steps 10 ...] [--guidance 3 ...]
        [--rescale 0 ...] [--checkpoint RUN/checkpoints/checkpoint-N [--no-ema]]
        [--padding keep|empty] [--misses] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import Counter

import numpy as np
import torch

from pipelines import TextToImagePipeline
from text_encoder.clip_model import eos_positions
from train.evaluate import assign, detect, evaluate
from train.loop import load_trained_weights
from train.shapes import describe, heldout_prompts, parse_caption, sample_scene


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


def colour_misses(images, prompts) -> str:
    """Where the colour claims of `prompts` fail on `images` (one per prompt), in one line."""
    claims = []  # (named colour, drawn colour or None, objects in the prompt, the other's colour)
    for image, (text, spec) in zip(images, prompts):
        spec = spec or parse_caption(text)
        objects = spec.objects
        for j, (obj, det) in enumerate(zip(objects, assign(spec, detect(image)))):
            if obj.color is not None:
                other = objects[1 - j].color if len(objects) == 2 else None
                claims.append((obj.color, det.color if det else None, len(objects), other))
    missed = [c for c in claims if c[1] != c[0]]
    per_n = [f"{n} object(s) {sum(c[2] == n for c in missed)}/{sum(c[2] == n for c in claims)}"
             for n in (1, 2)]  # fmt: skip
    took_other = sum(c[1] is not None and c[1] == c[3] for c in missed)
    pairs = Counter((c[0], c[1]) for c in missed).most_common(8)
    return (f"colour misses: {', '.join(per_n)}; took the other object's colour {took_other}; "
            f"named -> drawn {', '.join(f'{a}->{b} {k}' for (a, b), k in pairs)}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--n", type=int, default=100, help="prompts (seeds 0..n-1)")
    p.add_argument(
        "--prompt-seed",
        type=int,
        nargs="+",
        default=[0],
        help="which prompts (default 0: the ones `ldm train-default` scores; others: fresh sets)",
    )
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    p.add_argument("--sampler", nargs="+", default=["dpmpp_2m"])
    p.add_argument("--steps", type=int, nargs="+", default=None)
    p.add_argument("--guidance", type=float, nargs="+", default=None)
    p.add_argument("--rescale", type=float, nargs="+", default=[0.0])
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a training checkpoint of --model: score its EMA (else last) weights",
    )
    p.add_argument(
        "--no-ema", action="store_true", help="--checkpoint: its last trained weights, not the EMA"
    )
    p.add_argument("--padding", choices=("keep", "empty"), default="keep")
    p.add_argument("--misses", action="store_true", help="also print where colour fails")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = TextToImagePipeline.from_pretrained(args.model)
    pipe.progress = False
    if args.checkpoint:
        load_trained_weights(pipe, args.checkpoint, ema=not args.no_ema)
    if args.padding == "empty":
        empty_padding(pipe)
    defaults = pipe.call_defaults()
    steps_list = args.steps or [defaults["num_inference_steps"]]
    guidance_list = args.guidance or [defaults["guidance_scale"]]
    settings = itertools.product(args.sampler, steps_list, guidance_list, args.rescale)
    for setting in settings:
        results = [score(pipe, args, setting, prompt_seed) for prompt_seed in args.prompt_seed]
        if len(results) > 1:
            print(f"  mean of {len(results)} sets: {mean_scores(results)}", flush=True)


def mean_scores(results: list[dict]) -> dict:
    """Accuracy per claim over several sets (each result holds its rates and claim counts)."""
    out = {}
    for key in results[0]:
        if key.startswith("n_") or f"n_{key}" not in results[0]:
            continue
        right = sum(r[key] * r[f"n_{key}"] for r in results)
        out[key] = round(100 * right / max(1, sum(r[f"n_{key}"] for r in results)), 1)
    return out


def score(pipe, args, setting, prompt_seed: int) -> dict:
    """Score one sampling setting on one prompt set; print one line and return the result."""
    sampler, steps, guidance, rescale = setting
    prompts = prompts_for(args.split, args.n, prompt_seed)
    seeds = list(range(len(prompts)))
    start = time.perf_counter()
    images = []

    def generate(texts, seeds_, sampler=sampler, steps=steps, g=guidance, r=rescale, images=images):
        generators = [torch.Generator().manual_seed(s) for s in seeds_]
        out = pipe(texts, num_inference_steps=steps, guidance_scale=g, guidance_rescale=r,
                   sampler=sampler, output_type="np", generator=generators).images  # fmt: skip
        images.extend(out)
        return out

    result = evaluate(generate, prompts, seeds)
    scores = {k: round(100 * v, 1) for k, v in result.items() if not k.startswith("n_")}
    print(f"{args.split} n={len(prompts)} prompt-seed={prompt_seed} {sampler} "
          f"steps={steps} guidance={guidance} rescale={rescale} padding={args.padding}: "
          f"{scores} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    if args.misses:
        print("  " + colour_misses(images, prompts), flush=True)
    return result


if __name__ == "__main__":
    main()
