"""Fused QKV and the pipeline speed helpers keep the model's outputs and its state_dict keys."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from autoencoder import AUTOENCODER_PRESETS, AutoencoderKL
from ldm.attention import Attention
from ldm.schedule import ScheduleConfig
from ldm.unet import UNET_PRESETS, UNet
from pipelines import TextToImagePipeline
from pipelines.speed import compile_forward, compile_unet, cuda_graph_unet, reset_unet
from text_encoder import CLIP_TEXT_PRESETS, ClipBpeTokenizer, ClipTextEncoder, ClipTextModel

# Fused and separate projections compute the same dot products; only the matmul's blocking
# may reorder a sum, which stays far below 1e-6 on outputs of size ~1.
FUSED_TOL = 1e-6
ATTN1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."


@pytest.fixture
def unet_and_inputs():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["tiny"]).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    return unet, (x, torch.tensor([10.0, 700.0]), ctx)


def test_fused_qkv_matches_unfused(unet_and_inputs):
    unet, inputs = unet_and_inputs
    with torch.no_grad():
        ref = unet(*inputs)
        unet.fuse_qkv()
        out = unet(*inputs)
    assert (out - ref).abs().max().item() <= FUSED_TOL
    fused = [m for m in unet.modules() if isinstance(m, Attention) and m.fused]
    assert fused and all(m.is_self_attention for m in fused)  # cross-attention stays unfused
    assert not hasattr(fused[0], "to_q") and fused[0].qkv_weight.shape == (96, 32)


def test_fused_state_dict_keeps_the_keys_and_round_trips(unet_and_inputs, tmp_path):
    unet, inputs = unet_and_inputs
    ref_state = unet.state_dict()
    with torch.no_grad():
        ref = unet(*inputs)
    unet.fuse_qkv()
    state = unet.state_dict()
    assert list(state) == list(ref_state)  # same keys, same order
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    save_file(state, str(tmp_path / "w.safetensors"))  # no tensors sharing memory
    plain = UNet(UNET_PRESETS["tiny"]).eval()
    plain.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    other = UNet(UNET_PRESETS["tiny"]).eval()
    other.fuse_qkv()
    other.load_state_dict(ref_state)  # an unfused checkpoint into a fused model, strict
    with torch.no_grad():
        assert torch.equal(plain(*inputs), ref)
        assert (other(*inputs) - ref).abs().max().item() <= FUSED_TOL


def test_fused_load_names_missing_keys(unet_and_inputs):
    unet, _ = unet_and_inputs
    state = unet.state_dict()
    unet.fuse_qkv()
    partial = {k: v for k, v in state.items() if k != ATTN1 + "to_k.weight"}
    with pytest.raises(RuntimeError, match="to_k.weight") as err:
        unet.load_state_dict(partial)
    assert "unfuse_qkv" in str(err.value)
    missing = {k: v for k, v in state.items() if not k.startswith(ATTN1 + "to_")
               or k.startswith(ATTN1 + "to_out")}  # fmt: skip
    result = unet.load_state_dict(missing, strict=False)
    assert sorted(result.missing_keys) == [ATTN1 + f"to_{n}.weight" for n in "kqv"]


def test_unfuse_restores_layers_and_dtype_moves(unet_and_inputs):
    unet, inputs = unet_and_inputs
    with torch.no_grad():
        ref = unet(*inputs)
    unet.fuse_qkv()
    unet.half()
    assert unet.get_submodule(ATTN1[:-1]).qkv_weight.dtype == torch.float16
    unet.float().unfuse_qkv()
    assert isinstance(unet.get_submodule(ATTN1 + "to_v"), torch.nn.Linear)
    assert not any(isinstance(m, Attention) and m.fused for m in unet.modules())
    with torch.no_grad():  # float16 round trip of the weights: ~1e-3 relative
        assert torch.allclose(unet(*inputs), ref, atol=2e-2)


def test_fuse_refuses_cross_attention():
    attn = Attention(16, heads=2, head_dim=8, context_dim=12)
    with pytest.raises(ValueError, match="self-attention"):
        attn.fuse_qkv()


def _tiny_pipeline():
    torch.manual_seed(0)
    text = ClipTextEncoder(ClipTextModel(CLIP_TEXT_PRESETS["tiny"]), ClipBpeTokenizer.offline())
    unet, vae = UNet(UNET_PRESETS["tiny"]), AutoencoderKL(AUTOENCODER_PRESETS["tiny"])
    pipe = TextToImagePipeline(unet.eval(), vae.eval(), text, ScheduleConfig(), "ddim")
    pipe.progress = False
    return pipe


def _image(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=generator,
                output_type="pt").images  # fmt: skip


def test_compile_unet_keeps_the_image_and_the_keys():
    pipe = _tiny_pipeline()
    ref, keys = _image(pipe), list(pipe.unet.state_dict())
    # the "eager" backend runs dynamo's tracing without inductor's (slow on CPU) code generation
    compile_unet(pipe, "default", backend="eager")
    assert "forward" in pipe.unet.__dict__ and list(pipe.unet.state_dict()) == keys
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (_image(pipe) - ref).abs().max().item() <= 1e-5
    reset_unet(pipe)
    assert "forward" not in pipe.unet.__dict__


def test_speed_helpers_refuse_bad_input():
    pipe = _tiny_pipeline()
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_forward(pipe.unet, "fastest")
    with pytest.raises(ValueError, match="mode must be one of"):
        compile_unet(pipe, "fastest")
    assert not any(isinstance(m, Attention) and m.fused for m in pipe.unet.modules())
    with pytest.raises(ValueError, match="CUDA"):
        cuda_graph_unet(pipe)


def test_cpp_wrapper_spells_out_the_mode_for_inductor(monkeypatch):
    """torch.compile refuses a mode together with options: the C++ wrapper option carries the
    mode's own options with it."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    pipe = _tiny_pipeline()
    compile_unet(pipe, "max-autotune-no-cudagraphs", cpp_wrapper=True)
    assert "mode" not in seen[0]
    assert seen[0]["options"] == {"max_autotune": True, "coordinate_descent_tuning": True,
                                  "cpp_wrapper": True}  # fmt: skip
    reset_unet(pipe)
    compile_forward(pipe.unet, "default")
    assert seen[1]["mode"] == "default" and "options" not in seen[1]
    compile_forward(pipe.unet, "default", backend="eager", cpp_wrapper=True)  # no inductor
    assert "options" not in seen[2] and "mode" not in seen[2]
