"""Single-file (CompVis / A1111) <-> diffusers conversion: table, parity, architecture, safety.

Tiny diffusers models with random weights go to the original layout and back; the way in is
compared with diffusers' own single-file converter on the same tensors. Full-size SD 1.5 / 2.1
layouts are checked on the meta device (keys and shapes only, no memory).
"""

import os
import pickle
import sys
import types

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines.keymaps import unet_rules, vae_rules
from pipelines.single_file import (
    diffusers_to_original,
    infer_configs,
    load_state_dict_file,
    original_to_diffusers,
    save_single_file,
    split_original,
)

TINY_UNETS = {
    # SD 1.x layout: conv proj_in, fixed 8 heads, the deepest level without attention.
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
    ),
    # SD 2.x layout: linear proj_in, 64-wide heads, two transformer blocks, class embedding.
    "sd2": dict(
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=[1, 2],
        use_linear_projection=True,
        transformer_layers_per_block=2,
        num_class_embeds=10,
    ),
    # Inpainting: 9 input channels (latent, mask, masked-image latent); a projected class input.
    "sd1-inpaint": dict(
        in_channels=9,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=16,
    ),
}
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(
    cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
)
ARCHITECTURE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "use_linear_projection",
    "attention_head_dim",
    "transformer_layers_per_block",
    "num_class_embeds",
    "class_embed_type",
    "projection_class_embeddings_input_dim",
)


def tiny_unet(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, **TINY_UNETS[name]).eval()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
    ).eval()


@pytest.fixture(scope="module")
def clip() -> CLIPTextModel:
    torch.manual_seed(2)
    config = CLIPTextConfig(
        hidden_size=64,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=1,
        vocab_size=99,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def assert_same(ours: dict, reference: dict) -> None:
    """Same keys, bitwise-equal tensors (conversion only renames and reshapes)."""
    assert sorted(ours) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.equal(ours[key], tensor), key


def without_text_model(state: dict) -> dict:
    return {k.removeprefix("text_model."): v for k, v in state.items()}


# -- the table itself, on the full-size SD 1.5 layout ----------------------------------------


def test_sd15_unet_table_known_rows():
    config = dict(
        block_out_channels=[320, 640, 1280, 1280],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    )
    table = {rule.original: rule.diffusers for rule in unet_rules(config)}
    # Known places in every SD 1.x / 2.x checkpoint.
    assert table["time_embed.0."] == "time_embedding.linear_1."
    assert table["input_blocks.0.0."] == "conv_in."
    assert table["input_blocks.1.1."] == "down_blocks.0.attentions.0."
    assert table["input_blocks.3.0.op."] == "down_blocks.0.downsamplers.0.conv."
    assert table["input_blocks.11.0."] == "down_blocks.3.resnets.1."
    assert "input_blocks.12.0." not in table
    assert table["middle_block.1."] == "mid_block.attentions.0."
    assert table["middle_block.2."] == "mid_block.resnets.1."
    assert table["output_blocks.2.1.conv."] == "up_blocks.0.upsamplers.0.conv."  # no attention
    assert table["output_blocks.5.2.conv."] == "up_blocks.1.upsamplers.0.conv."  # after attention
    assert table["output_blocks.8.2.conv."] == "up_blocks.2.upsamplers.0.conv."
    assert table["output_blocks.11.1."] == "up_blocks.3.attentions.2."
    assert table["out.2."] == "conv_out."
    resnet = next(r for r in unet_rules(config) if r.original == "input_blocks.4.0.")
    assert resnet.inner["in_layers.2"] == "conv1"
    assert resnet.inner["skip_connection"] == "conv_shortcut"
    assert len(set(table.values())) == len(table)  # one-to-one


def test_sd_vae_table_known_rows():
    table = {rule.original: rule.diffusers for rule in vae_rules(SD_VAE)}
    assert table["encoder.down.0.block.1."] == "encoder.down_blocks.0.resnets.1."
    assert table["encoder.down.2.downsample.conv."] == "encoder.down_blocks.2.downsamplers.0.conv."
    assert "encoder.down.3.downsample.conv." not in table
    assert table["decoder.up.3.block.2."] == "decoder.up_blocks.0.resnets.2."  # bottom-up
    assert table["decoder.up.1.upsample.conv."] == "decoder.up_blocks.2.upsamplers.0.conv."
    assert table["encoder.mid.attn_1."] == "encoder.mid_block.attentions.0."
    assert table["decoder.norm_out."] == "decoder.conv_norm_out."


@pytest.mark.parametrize("preset", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_full_size_layout_matches_diffusers_converter(preset):
    with torch.device("meta"):  # shapes without memory
        unet = UNet2DConditionModel(**preset)
        vae = AutoencoderKL(**SD_VAE)
    components = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    original = diffusers_to_original(components, unet.config, vae.config)
    assert len(original) == 686 + 248  # SD 1.x / 2.x U-Net and VAE tensor counts
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    ours = original_to_diffusers(original)
    theirs_unet = convert_ldm_unet_checkpoint(original, dict(unet.config))
    theirs_vae = convert_ldm_vae_checkpoint(original, dict(vae.config))
    for ours_part, theirs, source in (
        (ours["unet"], theirs_unet, components["unet"]),
        (ours["vae"], theirs_vae, components["vae"]),
    ):
        assert sorted(ours_part) == sorted(theirs) == sorted(source)
        assert all(ours_part[k].shape == theirs[k].shape == source[k].shape for k in source)
    inferred = infer_configs(original, "v_prediction")["unet"]
    for key in ARCHITECTURE_KEYS:
        assert inferred.get(key) == _listed(unet.config.get(key)), key


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


# -- tiny random models: bitwise round trip, parity with diffusers, inferred architecture ------


@pytest.mark.parametrize("name", list(TINY_UNETS))
def test_unet_round_trip_and_parity(name):
    unet = tiny_unet(name)
    state = unet.state_dict()
    original = diffusers_to_original({"unet": state}, unet.config, None)
    assert all(k.startswith("model.diffusion_model.") for k in original)
    ours = original_to_diffusers(original)["unet"]
    assert_same(ours, state)
    assert_same(ours, convert_ldm_unet_checkpoint(original, dict(unet.config)))
    configs = infer_configs(original)
    assert configs["family"] == {"sd1": "sd1", "sd2": "sd2", "sd1-inpaint": "sd1-inpaint"}[name]
    for key in ARCHITECTURE_KEYS:
        assert configs["unet"].get(key) == _listed(unet.config.get(key)), key
    rebuilt = UNet2DConditionModel(**configs["unet"]).eval()
    rebuilt.load_state_dict(ours, strict=True)
    # Same weights and the same inferred head counts: the same function, bit for bit.
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 5, 64, generator=generator)
    extra = {}
    if unet.config.num_class_embeds:
        extra["class_labels"] = torch.tensor([3])
    if unet.config.class_embed_type == "projection":
        extra["class_labels"] = torch.randn(1, 16, generator=generator)
    with torch.no_grad():
        expected = unet(x, 10, context, **extra).sample
        assert torch.equal(rebuilt(x, 10, context, **extra).sample, expected)


def test_vae_round_trip_and_parity(vae):
    state = vae.state_dict()
    original = diffusers_to_original({"vae": state}, None, vae.config)
    assert original["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in original
    ours = original_to_diffusers(original)["vae"]
    assert_same(ours, state)
    assert_same(ours, convert_ldm_vae_checkpoint(original, dict(vae.config)))
    config = infer_configs(original)["vae"]
    rebuilt = AutoencoderKL(**config).eval()
    rebuilt.load_state_dict(ours, strict=True)
    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = vae(image, sample_posterior=False).sample
        assert torch.equal(rebuilt(image, sample_posterior=False).sample, expected)


def test_clip_round_trip_and_parity(clip):
    state = clip.state_dict()
    original = diffusers_to_original({"text_encoder": state}, None, None)
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in original
    ours = original_to_diffusers(original)["text_encoder"]
    assert_same(ours, state)
    assert_same(ours, without_text_model(convert_ldm_clip_checkpoint(original)))
    # Old transformers: a `text_model.` level in the model's own keys, and a persistent
    # position_ids buffer in the file.
    old = {"text_model." + k: v for k, v in state.items()}
    original_old = diffusers_to_original({"text_encoder": old}, None, None)
    original_old["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        16
    )[None]
    assert_same(original_to_diffusers(original_old)["text_encoder"], state)
    configs = infer_configs(original)
    assert configs["text_encoder_format"] == "clip" and configs["family"] == "sd1"
    rebuilt = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"], eos_token_id=2)).eval()
    rebuilt.load_state_dict(ours, strict=True)
    tokens = torch.tensor([[0, 5, 7, 2, 1]])
    with torch.no_grad():
        expected = clip(tokens).last_hidden_state
        assert torch.equal(rebuilt(tokens).last_hidden_state, expected)


def test_whole_file_through_disk(tmp_path, vae, clip):
    unet = tiny_unet("sd1")
    components = {
        "unet": unet.state_dict(),
        "vae": vae.state_dict(),
        "text_encoder": clip.state_dict(),
    }
    original = diffusers_to_original(components, unet.config, vae.config)
    path = tmp_path / "model.safetensors"
    save_single_file(path, original)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # the temporary file is gone
    loaded = load_state_dict_file(path)
    assert_same(loaded, original)
    back = original_to_diffusers(loaded)
    for name, state in components.items():
        assert_same(back[name], state)
    assert infer_configs(loaded)["family"] == "sd1"


# -- A1111 / CompVis extras ---------------------------------------------------------------------


def test_split_tolerates_training_leftovers(vae):
    unet = tiny_unet("sd1-inpaint")
    original = diffusers_to_original(
        {"unet": unet.state_dict(), "vae": vae.state_dict()}, unet.config, vae.config
    )
    ema = {
        "model_ema." + k[len("model.") :].replace(".", ""): v + 1
        for k, v in original.items()
        if k.startswith("model.diffusion_model.")
    }
    extras = {
        "alphas_cumprod": torch.linspace(1, 0, 10),
        "betas": torch.linspace(0, 1, 10),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(7),
        "first_stage_model.loss.logvar": torch.zeros(()),
    }
    checkpoint = {"state_dict": {**original, **ema, **extras}, "global_step": 470000}
    parts = split_original(checkpoint)
    assert sorted(parts) == ["unet", "vae"]
    assert not any(k.startswith("loss.") for k in parts["vae"])
    assert_same(original_to_diffusers(checkpoint)["unet"], unet.state_dict())
    with_ema = original_to_diffusers(checkpoint, use_ema=True)["unet"]
    assert_same(with_ema, {k: v + 1 for k, v in unet.state_dict().items()})
    with pytest.raises(ValueError, match="no EMA weights"):
        split_original(original, use_ema=True)


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="SDXL"):
        split_original({"conditioner.embedders.0.transformer.x.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no Stable Diffusion weights"):
        split_original({"alphas_cumprod": torch.zeros(3)})
    unet = tiny_unet("sd1-inpaint")
    state = {**unet.state_dict(), "down_blocks.0.resnets.0.bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="bogus"):
        diffusers_to_original({"unet": state}, unet.config, None)
    with pytest.raises(ValueError, match="unet_config is required"):
        diffusers_to_original({"unet": state}, None, None)
    with pytest.raises(ValueError, match="components"):
        diffusers_to_original({"transformer": {}}, None, None)
    with pytest.raises(ValueError, match="prediction_type"):
        infer_configs(diffusers_to_original({"unet": unet.state_dict()}, unet.config), "v")


def test_sd2_prediction_type_sets_the_768_v_fields():
    unet = tiny_unet("sd2")
    original = diffusers_to_original({"unet": unet.state_dict()}, unet.config, None)
    eps = infer_configs(original)
    v = infer_configs(original, prediction_type="v_prediction")
    assert (eps["prediction_type"], v["prediction_type"]) == ("epsilon", "v_prediction")
    assert (eps["unet"]["sample_size"], v["unet"]["sample_size"]) == (64, 96)
    assert (eps["unet"]["upcast_attention"], v["unet"]["upcast_attention"]) == (False, True)


# -- SD 2.x OpenCLIP text tower (text_encoder/openclip.py converts it) ---------------------------


def fake_open_clip(width: int = 64, layers: int = 2, vocab: int = 99, positions: int = 16) -> dict:
    """SD 2.x `cond_stage_model.model.*` tensors with random values."""
    torch.manual_seed(5)
    state = {
        "token_embedding.weight": torch.randn(vocab, width),
        "positional_embedding": torch.randn(positions, width),
        "ln_final.weight": torch.randn(width),
        "ln_final.bias": torch.randn(width),
        "text_projection": torch.randn(width, width),
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        shapes = {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "mlp.c_fc.weight": (4 * width, width),
            "mlp.c_fc.bias": (4 * width,),
            "mlp.c_proj.weight": (width, 4 * width),
            "mlp.c_proj.bias": (width,),
        }
        state.update({block + name: torch.randn(shape) for name, shape in shapes.items()})
    return {"cond_stage_model.model." + k: v for k, v in state.items()}


def test_open_clip_text_encoder_matches_diffusers():
    pytest.importorskip("text_encoder.openclip")
    original = fake_open_clip()
    ours = original_to_diffusers(original)["text_encoder"]
    reference = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=1,
            vocab_size=99,
            max_position_embeddings=16,
        )
    )
    theirs = without_text_model(convert_open_clip_checkpoint(reference, original))
    assert ours, "converter returned nothing"
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key
    # SD 2.x reads the penultimate layer, so a converter may leave out the last block and the
    # projection, which CLIPTextModel has no place for; nothing else may be missing.
    missing = {k for k in theirs if k not in ours}
    assert all(k == "text_projection.weight" or k.startswith("encoder.layers.1.") for k in missing)
    configs = infer_configs(original)
    assert configs["family"] == "sd2" and configs["text_encoder_format"] == "open_clip"
    rebuilt = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    rebuilt.load_state_dict(ours, strict=True)
    back = diffusers_to_original(
        {"text_encoder": ours}, None, None, text_encoder_format="open_clip"
    )
    assert all(k.startswith("cond_stage_model.model.") for k in back)
    # The block SD 2.x never runs is written back as an all-zero (identity) block.
    last = [k for k in back if k.startswith("cond_stage_model.model.transformer.resblocks.1.")]
    assert len(last) == 12 and all(not back[k].any() for k in last)
    assert_same(original_to_diffusers(back)["text_encoder"], ours)


def test_bad_text_encoder_format(clip):
    with pytest.raises(ValueError, match="text_encoder_format"):
        diffusers_to_original(
            {"text_encoder": clip.state_dict()}, None, None, text_encoder_format="t5"
        )


# -- files: corrupt files and pickles that would run code ------------------------------------


class _RunsCode:
    """Unpickling this opens (creates) a marker file: code execution, made visible."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused(tmp_path, zipped):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.ones(2)}, "x": _RunsCode(str(marker))}
    torch.save(payload, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match=r"evil\.ckpt: refused to load.*open"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_ckpt_nesting_and_lightning_callback(tmp_path, monkeypatch):
    # A Lightning ModelCheckpoint pickled beside the weights, as in some original SD .ckpt files.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.dirpath = "/logs"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    path = tmp_path / "model.ckpt"
    with monkeypatch.context() as patch:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
            patch.setitem(sys.modules, name, module)
        torch.save(
            {
                "state_dict": {"a.b": torch.ones(3)},
                "global_step": 5,
                "callbacks": {"ModelCheckpoint": ModelCheckpoint()},
            },
            path,
        )
    assert "pytorch_lightning" not in sys.modules or sys.modules["pytorch_lightning"] is not module
    loaded = load_state_dict_file(path)
    assert list(loaded) == ["a.b"] and torch.equal(loaded["a.b"], torch.ones(3))


def test_corrupt_files_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_single_file(good, {"w": torch.arange(1000.0)})
    data = good.read_bytes()
    cases = {
        "cut.safetensors": data[: len(data) // 2],
        "header.safetensors": data[:5],
        "noise.safetensors": b"\xff" * 64,
        "noise.ckpt": b"not a checkpoint at all",
    }
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "full.ckpt")
    cases["cut.ckpt"] = (tmp_path / "full.ckpt").read_bytes()[:300]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_state_dict_file(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_state_dict_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="suffix"):
        load_state_dict_file(good.rename(tmp_path / "good.txt"))
    with pytest.raises(ValueError, match="must end with .safetensors"):
        save_single_file(tmp_path / "out.ckpt", {"w": torch.ones(1)})


def test_save_gives_shared_tensors_their_own_memory(tmp_path):
    fused = torch.arange(12.0).reshape(3, 4)
    state = {"q": fused[0], "k": fused[1], "tied": fused, "same": fused}
    save_single_file(tmp_path / "x.safetensors", state)
    assert_same(load_state_dict_file(tmp_path / "x.safetensors"), state)


def test_legacy_torch_save_of_plain_tensors_loads(tmp_path):
    # A plain pickle of tensors (no torch zip container) is read through the same safe path.
    path = tmp_path / "plain.pt"
    torch.save(
        {"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_module=pickle
    )
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))
