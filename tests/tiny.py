"""Tiny random Stable Diffusion-style pipelines built with diffusers, for parity tests."""

import torch

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def tiny_components(style: str, in_channels: int = 4):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from text_encoder import offline_clip_tokenizer

    torch.manual_seed(0)
    if style == "sd1":
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    else:  # SD 2-style: linear projections, per-level head dims, upcast attention
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=32,
        )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),  # 32 groups: a single file cannot record another count
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=64,  # heads of 64 wide, as CLIP: a single file cannot record the head count
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=1,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    return unet.eval(), vae.eval(), text.eval(), offline_clip_tokenizer()


def save_reference(path, style, scheduler_config, in_channels=4):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, text, tok = tiny_components(style, in_channels)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        scheduler=DDIMScheduler(**scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
