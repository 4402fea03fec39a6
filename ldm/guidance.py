"""Classifier-free guidance as a wrapper around the model function (Ho & Salimans 2022).

The guided prediction is uncond + scale * (cond - uncond) (Ho & Salimans 2022, Eq. 6, with
w = scale - 1), optionally followed by the std rescale of Lin et al. 2023, Sec. 3.4. Both act
on the raw model output (eps, v or x0), before the Denoiser converts it to x0: the std rescale
does not commute with that conversion, and diffusers applies it to the model output too.

Conditioning is data: a tensor, or a dict / list / tuple of tensors (nested), e.g.
{"context": text_tokens, "pooled": text_embeds}. The unconditional and conditional branches are
batched as torch.cat([uncond, cond]) leaf by leaf, the order diffusers uses; leaves that are not
tensors (None, numbers, a shared callable) must be the same in both and pass through as they are.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

Conditioning = torch.Tensor | dict | list | tuple | None
ConditionedModelFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def _cat_branches(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Leaf-wise torch.cat([uncond, cond]) over matching nested dicts / lists / tuples."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise ValueError(f"uncond_context must mirror context: got {type(uncond)} for a tensor")
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or uncond.keys() != cond.keys():
            raise ValueError(f"uncond_context must have the keys of context: {sorted(cond)}")
        return {k: _cat_branches(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError(f"uncond_context must mirror context: a sequence of {len(cond)}")
        return type(cond)(_cat_branches(u, c) for u, c in zip(uncond, cond))
    if uncond is not cond and uncond != cond:  # non-tensor leaves are shared by both branches
        raise ValueError(f"uncond_context must equal context at non-tensor leaves: {cond!r}")
    return cond


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2023, Sec. 3.4: match the guided std to the conditional std."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


@dataclass(frozen=True, eq=False)
class GuidedModel:
    """model(x_in, t) -> guided prediction; one batched call over [uncond, cond]."""

    model_fn: ConditionedModelFn
    context: Conditioning
    batched_context: Conditioning  # [uncond, cond] concatenated once; None when scale <= 1
    scale: float
    rescale: float = 0.0

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        if self.scale <= 1:  # diffusers skips guidance here: the conditional branch alone
            return self.model_fn(x_in, t, self.context)
        out = self.model_fn(torch.cat([x_in, x_in]), t, self.batched_context)
        uncond, cond = out.chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        return rescale_guidance(guided, cond, self.rescale) if self.rescale > 0 else guided


def classifier_free_guidance(
    model_fn: ConditionedModelFn,
    context: Conditioning,
    uncond_context: Conditioning,
    scale: float,
    rescale: float = 0.0,
) -> GuidedModel:
    """Wrap model_fn(x_in, t, context) into a guided model(x_in, t) for a Denoiser.

    Args:
        model_fn: the network, model_fn(x_in, t, context) -> prediction (eps, v or x0).
        context: conditioning of the conditional branch (tensor or nested dict/list of them).
        uncond_context: the same structure for the unconditional branch (e.g. empty prompt).
        scale: guidance scale; at scale <= 1 only the conditional branch runs.
        rescale: guidance_rescale phi in [0, 1] (Lin et al. 2023, Sec. 3.4); 0 disables it.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1], got {rescale!r}")
    batched = _cat_branches(uncond_context, context) if scale > 1 else None
    return GuidedModel(model_fn, context, batched, float(scale), float(rescale))
