"""CLIP's text transformer in plain torch: transformers' CLIPTextModel without transformers.

    ids (B, L) -> token_embedding + position_embedding -> N x [x + attn(ln1(x)); x + mlp(ln2(x))]
               -> final_layer_norm -> last_hidden_state (B, L, D);  pooled = its row at the EOS

Attention is causal (each token sees itself and the tokens before it, Radford et al. 2021 §2.4),
through torch's scaled_dot_product_attention with the same arguments transformers passes
(is_causal=True, or a boolean causal-and-padding mask when attention_mask has zeros), so the
outputs equal transformers' on the same weights. The MLP's activation is `hidden_act`:
"quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x).

Pooled output: the final state at the first EOS token. Configs written before transformers
fixed `eos_token_id` (SD 1.x / 2.x folders say eos_token_id=2) pool at the largest id instead,
which is the EOS as long as no id above it occurs; we keep both rules, as transformers does.

Weights and config are those of a diffusers folder's `text_encoder/`: config.json (model_type
"clip_text_model", architectures ["CLIPTextModel"]) and model.safetensors whose keys carry the
`text_model.` prefix (text_model.embeddings.token_embedding.weight,
text_model.encoder.layers.0.self_attn.q_proj.weight, ..., text_model.final_layer_norm.weight),
which is also this module's state_dict. transformers' CLIPTextModel.from_pretrained (and so
diffusers) loads what `save_pretrained` writes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MODEL_TYPE = "clip_text_model"
ARCHITECTURE = "CLIPTextModel"
PREFIX = "text_model."
ACTIVATIONS = ("quick_gelu", "gelu")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ClipTextConfig:
    """A CLIP text transformer: the fields of transformers' CLIPTextConfig that shape it."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    projection_dim: int = 512  # unused by the text model; kept so config.json round-trips
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # 2 in configs older than transformers' fix: see pooling
    pad_token_id: int = 1
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    use_attention_mask: bool = False  # diffusers' opt-in padding mask; SD attends to padding

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size})"
            )
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be an int, got {self.eos_token_id!r}")

    @classmethod
    def from_dict(cls, config: dict) -> ClipTextConfig:
        """From transformers' config.json of a CLIPTextModel (other keys are ignored)."""
        model_type = config.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config model_type must be {MODEL_TYPE!r}, got {model_type!r}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    def to_dict(self, dtype: torch.dtype | None = None) -> dict:
        """transformers' config.json of a CLIPTextModel with these settings."""
        config = asdict(self)
        if not config["use_attention_mask"]:
            del config["use_attention_mask"]  # not a CLIPTextConfig field: written only if set
        out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **config}
        if dtype is not None:
            out["dtype"] = str(dtype).removeprefix("torch.")
        return out


# Named presets. The SD ones keep the token ids of their published config.json (eos 2).
CLIP_TEXT_PRESETS = {
    "sd15": ClipTextConfig(  # OpenAI CLIP ViT-L/14
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        projection_dim=768, bos_token_id=0, eos_token_id=2,
    ),
    "sd21": ClipTextConfig(  # OpenCLIP ViT-H/14, its last block dropped
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", bos_token_id=0, eos_token_id=2,
    ),
    "tiny": ClipTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=32,
    ),
}  # fmt: skip


@dataclass
class ClipTextOutput:
    """last_hidden_state (B, L, D), pooler_output (B, D), hidden_states: N + 1 of (B, L, D)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each layer's output


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, §2)."""
    return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (transformers' key names)."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, D); mask None = causal, else bool (B, 1, L, L), True = attend."""
        b, n, d = x.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None, scale=self.scale,
        )  # fmt: skip
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class ClipMlp(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.self_attn = ClipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMlp(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        # Uninitialised here (ClipTextModel.init_weights draws them): nn.Embedding's own init
        # calls normal_, which on the meta device imports torch._dynamo (seconds) at load time.
        d = config.hidden_size
        self.token_embedding = nn.Embedding.from_pretrained(
            torch.empty(config.vocab_size, d), freeze=False
        )
        self.position_embedding = nn.Embedding.from_pretrained(
            torch.empty(config.max_position_embeddings, d), freeze=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, room = ids.shape[-1], self.position_embedding.num_embeddings
        if n > room:
            raise ValueError(f"input_ids has {n} tokens but max_position_embeddings is {room}")
        return self.token_embedding(ids) + self.position_embedding.weight[:n]


class ClipEncoder(nn.Module):
    """The stack of encoder layers (a module of its own for the `encoder.layers.i` keys)."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            ClipEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )


class ClipTextTransformer(nn.Module):
    """Embeddings, encoder and final LayerNorm: what the `text_model.` prefix holds."""

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class ClipTextModel(nn.Module):
    """CLIP text model, called like transformers' CLIPTextModel: model(ids).last_hidden_state."""

    architecture = ARCHITECTURE  # the class name diffusers' model_index.json uses for it

    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.config = config
        self.text_model = ClipTextTransformer(config)
        self.gradient_checkpointing = False
        self.init_weights()

    @property
    def final_layer_norm(self) -> nn.LayerNorm:
        return self.text_model.final_layer_norm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ClipTextOutput:
        """input_ids (B, L) long; attention_mask (B, L), 1 = token, 0 = padding; or None."""
        model = self.text_model
        x = model.embeddings(input_ids)  # (B, L, D)
        mask = padding_mask(attention_mask, input_ids.shape[-1])
        hidden = [x]
        for layer in model.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
            hidden.append(x)
        last = model.final_layer_norm(x)
        rows = torch.arange(last.shape[0], device=last.device)
        pooled = last[rows, eos_positions(input_ids, self.config.eos_token_id).to(last.device)]
        states = tuple(hidden) if output_hidden_states else None
        return ClipTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass instead of storing its activations."""
        self.gradient_checkpointing = True

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP's initialisation (transformers' scheme): scaled normals, zero biases, unit norms."""
        if self.final_layer_norm.weight.is_meta:  # built to adopt loaded weights: nothing to draw
            return
        c, factor = self.config, self.config.initializer_factor
        depth = (2 * c.num_hidden_layers) ** -0.5
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02 * factor)
            if isinstance(module, ClipAttention):
                for proj in (module.q_proj, module.k_proj, module.v_proj):
                    nn.init.normal_(proj.weight, std=c.hidden_size**-0.5 * depth * factor)
                nn.init.normal_(module.out_proj.weight, std=c.hidden_size**-0.5 * factor)
            elif isinstance(module, ClipMlp):
                nn.init.normal_(module.fc1.weight, std=(2 * c.hidden_size) ** -0.5 * factor)
                nn.init.normal_(module.fc2.weight, std=c.hidden_size**-0.5 * depth * factor)

    # ---- the diffusers / transformers folder format ---------------------------------------------

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], config: ClipTextConfig
    ) -> ClipTextModel:
        """Adopt a CLIPTextModel state dict (keys with or without `text_model.`); no random init."""
        state = {
            (k if k.startswith(PREFIX) else PREFIX + k): v
            for k, v in state_dict.items()
            if not k.endswith("position_ids")  # an arange buffer that older transformers saved
        }
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict().keys()
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"state_dict does not fit the config ({config.num_hidden_layers} layers, width "
                f"{config.hidden_size}): {len(missing)} missing keys {missing[:3]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:3]}"
            )
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None) -> ClipTextModel:
        """Load a text_encoder/ folder: config.json + model.safetensors (or pytorch_model.bin).

        dtype None keeps config.json's "dtype" (or "torch_dtype"), else the stored dtype, as
        transformers' dtype="auto" does.
        """
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no text encoder at {folder} (config.json is missing)")
        raw = json.loads((folder / "config.json").read_text())
        model = cls.from_state_dict(load_state(folder), ClipTextConfig.from_dict(raw))
        if dtype is None:
            dtype = DTYPES.get(raw.get("dtype") or raw.get("torch_dtype"))
        return model if dtype is None else model.to(dtype)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json + model.safetensors (keys with the `text_model.` prefix)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = next(self.parameters()).dtype
        config = json.dumps(self.config.to_dict(dtype), indent=2, sort_keys=True)
        (folder / "config.json").write_text(config + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """None (plain causal attention) or bool (B, 1, L, L): causal AND key is not padding.

    Like transformers, a mask without zeros is dropped, so SDPA runs its is_causal path.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    device = attention_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def eos_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the token to pool per row: the first EOS, or the largest id for eos_token_id=2."""
    ids = input_ids.to(torch.int)  # argmax has no int64 kernel in some exporters
    if eos_token_id == 2:  # configs from before transformers' eos fix: EOS is the largest id
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a text_encoder/ folder: safetensors (one file or shards), or a safe pickle."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if (folder / WEIGHT_FILES[0]).is_file():
        return load_file(folder / WEIGHT_FILES[0])
    if (folder / WEIGHT_FILES[1]).is_file():
        return torch.load(folder / WEIGHT_FILES[1], map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no text encoder weights in {folder} (looked for {WEIGHT_FILES})")
