"""Inference speed for a pipeline's U-Net: torch.compile, and CUDA-graph replay for fixed shapes.

Both act on `pipe.unet` in place by shadowing its `forward` with a wrapper (an instance
attribute), so the pipeline, the U-Net's parameters and its state_dict keys stay as they are:
save_pretrained still writes diffusers' keys, `.to()` still moves the weights.

    compile_unet(pipe)       # torch.compile(unet.forward); the first call compiles (minutes)
    cuda_graph_unet(pipe)    # then replay each input shape from a captured CUDA graph
    reset_unet(pipe)         # the plain eager forward again (fused QKV and layout stay)

The CUDA graph removes the per-kernel launch cost of the Python forward, which dominates at
batch 2 on a fast GPU; torch.compile's "reduce-overhead" mode does the same with its own graph
trees, while "max-autotune-no-cudagraphs" tunes kernels and leaves the replay to this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")


def compile_forward(
    module: nn.Module,
    mode: str = "max-autotune-no-cudagraphs",
    *,
    fullgraph: bool = False,
    backend: str = "inductor",
    cpp_wrapper: bool = False,
) -> nn.Module:
    """Shadow module.forward with torch.compile(module.forward); returns the module.

    Args:
        module: any nn.Module (ours or diffusers' U-Net); compiled in place, keys unchanged.
        mode: one of COMPILE_MODES (inductor only).
        fullgraph: fail on a graph break instead of falling back to Python for that part.
        backend: torch.compile backend; "eager" only traces (quick, to test the tracing).
        cpp_wrapper: inductor launches the kernels from generated C++ instead of generated
            Python: less host time per kernel, for calls bound by launching (~650 kernels per
            SD U-Net call), at the cost of a C++ compile on the first call.
    """
    _check_mode(mode)
    if isinstance(module.__dict__.get("forward"), CudaGraphForward):
        raise ValueError("compile before capturing CUDA graphs: the graph replays what it captured")
    if backend != "inductor":
        options = {}
    elif cpp_wrapper:  # torch.compile takes a mode or options, not both: spell the mode out
        from torch._inductor import list_mode_options

        options = {"options": {**list_mode_options(mode), "cpp_wrapper": True}}
    else:
        options = {"mode": mode}
    forward = torch.compile(module.forward, fullgraph=fullgraph, backend=backend, dynamic=False,
                            **options)  # fmt: skip
    module.forward = forward
    return module


def compile_unet(
    pipe,
    mode: str = "max-autotune-no-cudagraphs",
    *,
    fuse_qkv: bool = True,
    channels_last: bool = True,
    fullgraph: bool = False,
    backend: str = "inductor",
    cpp_wrapper: bool = False,
):
    """torch.compile the pipeline's U-Net in place (after fusing QKV, channels_last); returns pipe.

    Args:
        pipe: a pipelines.DiffusionPipeline.
        mode: one of COMPILE_MODES; "default" compiles fastest, the "max-autotune" modes also
            benchmark kernel choices and take several times longer.
        fuse_qkv: project each self-attention's q, k, v with one matmul (UNet.fuse_qkv).
        channels_last: NHWC weights and activations, the layout tensor-core convolutions use.
        fullgraph, backend: as for torch.compile.
        cpp_wrapper: launch the compiled kernels from C++ (see compile_forward).
    """
    _check_mode(mode)  # before changing anything
    unet = pipe.unet
    if fuse_qkv:
        unet.fuse_qkv()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    compile_forward(unet, mode, fullgraph=fullgraph, backend=backend, cpp_wrapper=cpp_wrapper)
    return pipe


@dataclass
class _Captured:
    """One captured U-Net call: its static input buffers, the graph, and its output buffer."""

    inputs: tuple[Tensor, ...]
    graph: torch.cuda.CUDAGraph
    output: Tensor


class CudaGraphForward:
    """forward(x, t, context) replayed from a CUDA graph captured once per input shape and dtype.

    Inputs are copied into the graph's static buffers and the output is returned as a copy, so
    callers see an ordinary function. Calls with class labels, on the CPU, or with gradients
    enabled run the wrapped forward as it is.
    """

    def __init__(self, forward, warmup: int = 2):
        self.forward = forward
        self.warmup = warmup  # calls before capture: cuDNN autotuning, compilation, allocations
        self.pool = None  # one memory pool for all shapes, made at the first capture
        self.graphs: dict[tuple, _Captured] = {}

    def __call__(self, x: Tensor, t, context: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is not None or not x.is_cuda or torch.is_grad_enabled():
            return self.forward(x, t, context, class_labels)
        t = torch.as_tensor(t, device=x.device)  # shape kept: a compiled forward guards on it
        inputs = (x, t, context)
        key = tuple((tuple(a.shape), a.dtype) for a in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        captured = self.graphs[key]
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, inputs: tuple[Tensor, ...]) -> _Captured:
        static = tuple(a.clone() for a in inputs)  # clone keeps x's memory format
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture stream, as CUDA graphs require
            for _ in range(self.warmup):
                self.forward(*static)
        torch.cuda.current_stream().wait_stream(side)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.forward(*static)
        return _Captured(static, graph, output)


def cuda_graph_unet(pipe, warmup: int = 2):
    """Replay the pipeline's U-Net from CUDA graphs (one per input shape); returns pipe.

    Call after compile_unet if both are wanted. Each captured shape keeps its activations
    allocated, and the graphs read the weights where they were at capture: reset_unet before
    moving the pipeline or replacing weights (LoRA, another checkpoint).
    """
    unet = pipe.unet
    if next(unet.parameters()).device.type != "cuda":
        raise ValueError(
            "cuda_graph_unet needs the U-Net on a CUDA device; move the pipeline first"
        )
    if not isinstance(unet.__dict__.get("forward"), CudaGraphForward):
        unet.forward = CudaGraphForward(unet.forward, warmup)
    return pipe


def reset_unet(pipe):
    """Undo compile_unet and cuda_graph_unet: the U-Net's own forward again; returns pipe."""
    pipe.unet.__dict__.pop("forward", None)
    return pipe
