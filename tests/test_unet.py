"""U-Net: parity with diffusers' UNet2DConditionModel on the same random weights, config
round trips, timestep broadcasting, dtypes, clear errors, backends, checkpointing, and the
receptive-field check."""

import dataclasses
import warnings

import pytest
import torch

from ldm.attention import available_backends
from ldm.unet import UNET_PRESETS, UNet, UNetConfig, receptive_field, timestep_embedding

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

PARITY_CONFIGS = {
    # SD 1.x style: conv proj_in/out, one head count for all levels, last level without attention
    "sd1": UNetConfig(
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=4,
        cross_attention_dim=24, norm_num_groups=8, sample_size=16,
        down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP),
    ),
    # SD 2.x style: linear projections, per-level heads, upcast attention; plus uneven depths
    "sd2": UNetConfig(
        block_out_channels=(32, 64, 96), layers_per_block=(1, 2, 1), attention_head_dim=(2, 4, 6),
        transformer_layers_per_block=(1, 2, 1), cross_attention_dim=40, norm_num_groups=16,
        use_linear_projection=True, upcast_attention=True,
        down_block_types=(CA_DOWN,) * 3, up_block_types=(CA_UP,) * 3,
    ),
    # 9 input channels (inpainting) and class labels (x4 upscaler: noise level as class, and
    # cross-attention only in the first attention of the first level)
    "class_inpaint": UNetConfig(
        in_channels=9, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
        cross_attention_dim=16, norm_num_groups=8, num_class_embeds=10,
        only_cross_attention=(True, False), downsample_padding=0, mid_block_scale_factor=1.5,
        down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP),
    ),
    # num_attention_heads given (written to diffusers as attention_head_dim), no attention at all
    "heads_no_attn_mid": UNetConfig(
        block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(99, 99),
        num_attention_heads=(2, 4), cross_attention_dim=16, norm_num_groups=8,
        mid_block_type="UNetMidBlock2D", down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, UP),
    ),
}  # fmt: skip


def _pair(config: UNetConfig, seed: int = 0):
    """diffusers' U-Net with random weights (norms too) and ours with the same weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ref = UNet2DConditionModel.from_config(config.to_diffusers()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)  # default init zeroes nothing, but randomize norms and biases too
    ours = UNet(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(config: UNetConfig, b=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, config.in_channels, size, size, generator=g)
    ctx = torch.randn(b, 7, config.cross_attention_dim, generator=g)
    labels = torch.arange(b) % config.num_class_embeds if config.num_class_embeds else None
    return x, ctx, labels


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_pair():
    return _pair(UNET_PRESETS["tiny"])


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_parity_with_diffusers(name):
    config = PARITY_CONFIGS[name]
    ref, ours = _pair(config)
    x, ctx, labels = _inputs(config)
    t = torch.tensor([10.5, 700.0])
    with torch.no_grad():
        expected = ref(x, t, ctx, class_labels=labels).sample
        out = ours(x, t, ctx, labels)
    # the same float32 ops in the same order: measured bit-identical (0.0); the bound leaves
    # room for kernels that sum in another order (another CPU, another torch), ~1e-6 each
    assert _rel_err(out, expected) < 1e-5
    back = UNetConfig.from_diffusers(dict(ref.config))  # diffusers' full config, defaults included
    assert back.heads == config.heads
    assert back == config or config.num_attention_heads is not None


@pytest.mark.parametrize("name", ["sd15", "sd21", "shapes2", "shapes3"])
def test_presets_have_diffusers_keys_and_shapes(name):
    from diffusers import UNet2DConditionModel

    config = UNET_PRESETS[name]
    with torch.device("meta"):  # no memory, no init: only names and shapes
        ours = UNet(config)
        ref = UNet2DConditionModel.from_config(config.to_diffusers())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    if name == "sd15":
        assert sum(p.numel() for p in ours.parameters()) == 859_520_964


def test_dropout_where_diffusers_has_it():
    from diffusers import UNet2DConditionModel

    config = dataclasses.replace(UNET_PRESETS["tiny"], dropout=0.1)
    ref = UNet2DConditionModel.from_config(config.to_diffusers())

    def rates(model):
        return {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}

    assert rates(UNet(config)) == rates(ref)
    assert sorted(set(rates(ref).values())) == [0.0, 0.1]  # ResNets 0.1, transformers 0


def test_tiny_preset_is_small():
    n = sum(p.numel() for p in UNet(UNET_PRESETS["tiny"]).parameters())
    assert 100_000 < n < 1_000_000
    assert UNET_PRESETS["tiny"].num_levels == 2


# unet/config.json of runwayml/stable-diffusion-v1-5 and of stabilityai/stable-diffusion-2-1
SD15_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [CA_DOWN, CA_DOWN, CA_DOWN, DOWN],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [UP, CA_UP, CA_UP, CA_UP],
}
SD21_JSON = SD15_JSON | {
    "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
    "use_linear_projection": True,
}  # fmt: skip


def test_presets_are_the_released_configs():
    assert UNetConfig.from_diffusers(SD15_JSON) == UNET_PRESETS["sd15"]
    assert UNetConfig.from_diffusers(SD21_JSON) == UNET_PRESETS["sd21"]


def test_config_round_trip_and_refusals():
    for config in list(UNET_PRESETS.values()) + list(PARITY_CONFIGS.values())[:3]:
        assert UNetConfig.from_diffusers(config.to_diffusers()) == config
    d = UNET_PRESETS["sd15"].to_diffusers() | {"_diffusers_version": "0.30.0"}
    assert UNetConfig.from_diffusers(d) == UNET_PRESETS["sd15"]
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        UNetConfig.from_diffusers(d | {"addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNetConfig.from_diffusers(d | {"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unknown UNet config key 'foo'"):
        UNetConfig.from_diffusers(d | {"foo": 1})
    with pytest.raises(ValueError, match="down_block_types must be 4 names"):
        UNetConfig.from_diffusers(d | {"down_block_types": ["AttnDownBlock2D"] * 4})
    with pytest.raises(ValueError, match="cross_attention_dim must be one width"):
        UNetConfig.from_diffusers(d | {"cross_attention_dim": [768, 768, 1024, 1024]})
    sd15 = UNET_PRESETS["sd15"]
    with pytest.raises(
        ValueError, match="heads at level 1 must be a positive int dividing its 640"
    ):
        dataclasses.replace(sd15, attention_head_dim=(8, 7, 8, 8))
    with pytest.raises(ValueError, match=r"layers_per_block must be positive ints, got \(2, 0"):
        dataclasses.replace(sd15, layers_per_block=(2, 0, 2, 2))


def test_timestep_forms_broadcast_like_diffusers(tiny_pair):
    ref, ours = tiny_pair
    x, ctx, _ = _inputs(ours.config)
    with torch.no_grad():
        base = ours(x, torch.tensor([10, 10]), ctx)
        for t in (10, 10.0, torch.tensor(10), torch.tensor([10]), torch.tensor([10.0, 10.0])):
            torch.testing.assert_close(ours(x, t, ctx), base, rtol=0, atol=0)
        # fractional timesteps (samplers pass them) are embedded, not rounded
        frac = ours(x, 10.5, ctx)
        torch.testing.assert_close(frac, ref(x, 10.5, ctx).sample, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(frac, base)
    with pytest.raises(ValueError, match=r"shape \(1,\) or \(2,\); got shape \(3,\)"):
        ours(x, torch.tensor([1, 2, 3]), ctx)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 3.5])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0)
    freqs = 10000 ** (-torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 9).shape == (2, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(tiny_pair, dtype):
    _, ours = tiny_pair
    x, ctx, _ = _inputs(ours.config, b=3, size=8)
    model = UNet(ours.config).eval()
    model.load_state_dict(ours.state_dict())
    model.to(dtype)
    with torch.no_grad():
        out = model(x.to(dtype), 5, ctx.to(dtype))
        expected = ours(x, 5, ctx)
    assert out.shape == (3, 4, 8, 8) and out.dtype == dtype
    # bfloat16 keeps 8 mantissa bits; over ~20 layers the error grows to ~1e-2 (measured)
    assert _rel_err(out.float(), expected) < (1e-6 if dtype == torch.float32 else 5e-2)


def test_clear_errors(tiny_pair):
    _, ours = tiny_pair
    x, ctx, _ = _inputs(ours.config)
    with pytest.raises(ValueError, match=r"in_channels=4.*got shape \(2, 3, 16, 16\)"):
        ours(x[:, :3], 1, ctx)
    with pytest.raises(
        ValueError, match=r"spatial size \(10, 16\) must be divisible by 4: 3 levels"
    ):
        UNet(PARITY_CONFIGS["sd1"])(torch.randn(1, 4, 10, 16), 1, ctx[:1, :, :24])
    with pytest.raises(ValueError, match=r"cross_attention_dim=32.*width 24"):
        ours(x, 1, ctx[..., :24])
    with pytest.raises(ValueError, match="class_labels must be given"):
        ours(x, 1, ctx, torch.tensor([0, 1]))
    model = UNet(PARITY_CONFIGS["class_inpaint"])
    x9, ctx9, _ = _inputs(model.config)
    with pytest.raises(ValueError, match="num_class_embeds=10"):
        model(x9, 1, ctx9)


def test_every_backend_matches_math(tiny_pair):
    _, ours = tiny_pair
    x, ctx, _ = _inputs(ours.config)
    with torch.no_grad():
        ours.set_attention_backend("math")
        ref = ours(x, 3, ctx)
        for backend in available_backends("cpu"):
            ours.set_attention_backend(backend, slice_size=50 if backend == "sliced" else None)
            assert _rel_err(ours(x, 3, ctx), ref) < 1e-5, backend
    ours.set_attention_backend("sdpa")
    with pytest.raises(ValueError, match="must be one of"):
        ours.set_attention_backend("flash")


def test_gradient_checkpointing_same_gradients():
    config = UNET_PRESETS["tiny"]
    torch.manual_seed(0)
    model = UNet(config)
    x, ctx, _ = _inputs(config, size=8)

    def grads():
        model.zero_grad()
        model(x, 7, ctx).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    calls, resnet = [], model.down_blocks[0].resnets[0]
    forward = resnet.forward
    resnet.forward = lambda *args: calls.append(1) or forward(*args)
    plain = grads()
    assert len(calls) == 1
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    for a, b in zip(grads(), plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len(calls) == 3  # forward, then recomputed in the backward pass


def test_channels_last_matches_contiguous(tiny_pair):
    _, ours = tiny_pair
    x, ctx, _ = _inputs(ours.config)
    model = UNet(ours.config).eval()
    model.load_state_dict(ours.state_dict())
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last), 3, ctx)
        assert _rel_err(out, ours(x, 3, ctx)) < 1e-5


NO_ATTENTION = UNetConfig(
    block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=2, cross_attention_dim=8,
    norm_num_groups=4, mid_block_type="UNetMidBlock2D",
    down_block_types=(DOWN, DOWN), up_block_types=(UP, UP),
)  # fmt: skip


def test_receptive_field_matches_gradient_support():
    # conv_in 3, level 0 ResNet +4, downsample +2, level 1 ResNet +8, mid ResNet +8 = 25
    rf = receptive_field(NO_ATTENTION, 32)
    assert (rf.conv_field, rf.needed_field, rf.self_attention) == (25, 63, None)
    assert rf.deepest_size == (16, 16) and not rf.sees_whole_latent
    # the corner feature of the mid block sees latent pixels 0..(25 - 1) / 2 = 12
    torch.manual_seed(0)
    model = UNet(NO_ATTENTION)
    # GroupNorm statistics span the whole map but carry no layout; take them out to see the convs
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    feats = {}
    model.mid_block.register_forward_hook(lambda m, i, o: feats.setdefault("mid", o))
    x = torch.randn(1, 4, 32, 32, requires_grad=True)
    model(x, 1, torch.randn(1, 2, 8))
    feats["mid"][0, :, 0, 0].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen[0, :13].all() and not seen[0, 13:].any()
    assert seen[:13, 0].all() and not seen[13:, 0].any()


def test_receptive_field_attention_and_warning():
    assert receptive_field(UNET_PRESETS["sd15"], 128).self_attention == "down level 0"
    assert receptive_field(NO_ATTENTION, 12).sees_whole_latent  # 25 >= 2·12 - 1
    mid_only = dataclasses.replace(NO_ATTENTION, mid_block_type="UNetMidBlock2DCrossAttn")
    assert receptive_field(mid_only, 64).self_attention == "mid block"
    with pytest.warns(UserWarning, match="mismatched eyes"):
        UNet(dataclasses.replace(NO_ATTENTION, sample_size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UNet(dataclasses.replace(NO_ATTENTION, sample_size=12))
        UNet(UNET_PRESETS["tiny"])
