"""Configs of Qwen2-VL / Qwen2.5-VL: `VisionConfig`, `TextConfig`, `ModelConfig`.

`ModelConfig.from_hf_dict` reads the hub's flat legacy config.json and the nested layout transformers 5 writes;
`to_hf_dict` writes the nested layout. `ModelConfig.tiny` is the ~1M-parameter config of the tests and the toy world;
`ModelConfig.qwen2_5_vl("3b" | "7b")` gives the released checkpoints' widths (random weights: benches, memory plans).
"""

import dataclasses
from dataclasses import dataclass, field

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@dataclass
class VisionConfig:
    """The vision tower. Field names follow Qwen2.5-VL; Qwen2-VL's embed_dim / mlp_ratio /
    hidden_size are read into hidden_size / intermediate_size / out_hidden_size."""

    depth: int = 32
    hidden_size: int = 1280  # width inside the tower
    num_heads: int = 16
    intermediate_size: int = 3420
    hidden_act: str = "silu"
    out_hidden_size: int = 2048  # = the language model's hidden size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # Qwen2.5 only: window side in pixels
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])  # Qwen2.5 only
    tokens_per_second: int = 2  # Qwen2.5 video timing; unused here, kept for the round trip
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    """The Qwen2 decoder."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])  # (t, h, w) frequency pairs
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# The released checkpoints' decoders (the vision tower is the same in both): (TextConfig fields, tie_word_embeddings).
QWEN2_5_VL_TEXT = {
    "3b": (dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2), True),
    "7b": (dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4), False),
}


@dataclass
class ModelConfig:
    model_type: str = "qwen2_5_vl"
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        text, vision = self.text, self.vision
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if text.hidden_size % text.num_attention_heads or text.num_attention_heads % text.num_key_value_heads:
            raise ValueError(
                f"TextConfig: hidden_size {text.hidden_size} must divide into num_attention_heads "
                f"{text.num_attention_heads}, which must divide into num_key_value_heads {text.num_key_value_heads}"
            )
        if len(text.mrope_section) != 3 or sum(text.mrope_section) != text.head_dim // 2:
            raise ValueError(
                f"TextConfig.mrope_section {text.mrope_section} must be 3 numbers summing to head_dim/2 = "
                f"{text.head_dim // 2}"
            )
        if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
            raise ValueError(
                f"VisionConfig: hidden_size {vision.hidden_size} / num_heads {vision.num_heads} must give a head_dim "
                f"divisible by 4 (2-D rotary over h and w)"
            )
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"VisionConfig.out_hidden_size {vision.out_hidden_size} != TextConfig.hidden_size {text.hidden_size}"
            )
        merger_window = vision.spatial_merge_size * vision.patch_size
        if self.model_type == "qwen2_5_vl" and vision.window_size % merger_window:
            raise ValueError(
                f"VisionConfig.window_size {vision.window_size} must be a multiple of patch_size*spatial_merge_size "
                f"= {merger_window}"
            )

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict: the hub's flat legacy layout or transformers-5's nested one."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json: model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        text_d = d.get("text_config") or d  # nested (transformers 5) or flat (hub legacy)
        vision_d = d.get("vision_config") or {}

        def pick(key, default=None):
            # Special ids sit at the top level in legacy files and in text_config in nested ones.
            for source in (d, text_d):
                if source.get(key) is not None:
                    return source[key]
            return default

        if text_d.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported (no Qwen2-VL checkpoint uses it)")
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or d.get("rope_scaling") or {}
        text = TextConfig(
            vocab_size=text_d["vocab_size"],
            hidden_size=text_d["hidden_size"],
            intermediate_size=text_d["intermediate_size"],
            num_hidden_layers=text_d["num_hidden_layers"],
            num_attention_heads=text_d["num_attention_heads"],
            num_key_value_heads=text_d.get("num_key_value_heads") or text_d["num_attention_heads"],
            hidden_act=text_d.get("hidden_act", "silu"),
            rms_norm_eps=text_d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", text_d.get("rope_theta", 1000000.0)),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            max_position_embeddings=text_d.get("max_position_embeddings", 32768),
            initializer_range=text_d.get("initializer_range", 0.02),
        )
        vision_rope = vision_d.get("rope_parameters") or {}
        common = dict(
            depth=vision_d["depth"],
            num_heads=vision_d["num_heads"],
            in_channels=vision_d.get("in_channels", vision_d.get("in_chans", 3)),
            patch_size=vision_d.get("patch_size", 14),
            temporal_patch_size=vision_d.get("temporal_patch_size", 2),
            spatial_merge_size=vision_d.get("spatial_merge_size", 2),
            rope_theta=vision_rope.get("rope_theta", 10000.0),
        )
        if model_type == "qwen2_vl":
            vision = VisionConfig(
                hidden_size=vision_d["embed_dim"],
                intermediate_size=vision_d["embed_dim"] * vision_d.get("mlp_ratio", 4),
                hidden_act=vision_d.get("hidden_act", "quick_gelu"),
                out_hidden_size=vision_d.get("hidden_size", text.hidden_size),
                **common,
            )
        else:
            vision = VisionConfig(
                hidden_size=vision_d["hidden_size"],
                intermediate_size=vision_d.get("intermediate_size", 3420),
                hidden_act=vision_d.get("hidden_act", "silu"),
                out_hidden_size=vision_d.get("out_hidden_size", text.hidden_size),
                window_size=vision_d.get("window_size", 112),
                fullatt_block_indexes=list(vision_d.get("fullatt_block_indexes", [7, 15, 23, 31])),
                tokens_per_second=vision_d.get("tokens_per_second", 2),
                **common,
            )
        tie = bool(d.get("tie_word_embeddings") or text_d.get("tie_word_embeddings"))
        return cls(
            model_type=model_type,
            text=text,
            vision=vision,
            image_token_id=pick("image_token_id", 151655),
            video_token_id=pick("video_token_id", 151656),
            vision_start_token_id=pick("vision_start_token_id", 151652),
            vision_end_token_id=pick("vision_end_token_id", 151653),
            bos_token_id=pick("bos_token_id"),
            eos_token_id=pick("eos_token_id"),
            pad_token_id=pick("pad_token_id"),
            tie_word_embeddings=tie,
            torch_dtype=str(pick("torch_dtype") or pick("dtype") or "float32"),
        )

    def to_hf_dict(self) -> dict:
        """The nested config.json layout transformers 5 writes (and loads unchanged)."""
        text, vision = self.text, self.vision
        text_d = {
            "model_type": f"{self.model_type}_text",
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "hidden_act": text.hidden_act,
            "rms_norm_eps": text.rms_norm_eps,
            "max_position_embeddings": text.max_position_embeddings,
            "initializer_range": text.initializer_range,
            "use_sliding_window": False,
            "rope_parameters": {
                "rope_type": "default",
                "type": "mrope",
                "mrope_section": list(text.mrope_section),
                "rope_theta": text.rope_theta,
            },
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        vision_d = {
            "model_type": f"{self.model_type}_vision",
            "depth": vision.depth,
            "num_heads": vision.num_heads,
            "hidden_act": vision.hidden_act,
            "in_channels": vision.in_channels,
            "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
        }
        if self.model_type == "qwen2_vl":
            if vision.intermediate_size % vision.hidden_size:
                raise ValueError(
                    f"VisionConfig: qwen2_vl stores mlp_ratio, so intermediate_size {vision.intermediate_size} must "
                    f"be a multiple of hidden_size {vision.hidden_size}"
                )
            vision_d.update(
                embed_dim=vision.hidden_size,
                mlp_ratio=vision.intermediate_size // vision.hidden_size,
                hidden_size=vision.out_hidden_size,
            )
        else:
            vision_d.update(
                hidden_size=vision.hidden_size,
                intermediate_size=vision.intermediate_size,
                out_hidden_size=vision.out_hidden_size,
                window_size=vision.window_size,
                fullatt_block_indexes=list(vision.fullatt_block_indexes),
                tokens_per_second=vision.tokens_per_second,
            )
        return {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "dtype": self.torch_dtype,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text_d,
            "vision_config": vision_d,
        }

    @classmethod
    def qwen2_5_vl(cls, size: str, layers: int | None = None, vision_depth: int | None = None) -> "ModelConfig":
        """The widths of Qwen2.5-VL-3B/7B-Instruct's config.json; layers / vision_depth cut the depth to fit a CPU.

        A cut vision tower keeps its last block full-attention, as every full-depth stage ends with one.
        """
        if size not in QWEN2_5_VL_TEXT:
            raise ValueError(f"ModelConfig.qwen2_5_vl: size must be one of {sorted(QWEN2_5_VL_TEXT)}, got {size!r}")
        text_fields, tie = QWEN2_5_VL_TEXT[size]
        text = TextConfig(**text_fields, max_position_embeddings=128000)
        vision = VisionConfig(out_hidden_size=text.hidden_size)
        if layers is not None:
            text.num_hidden_layers = layers
        if vision_depth is not None:
            vision.depth = vision_depth
            vision.fullatt_block_indexes = [i for i in vision.fullatt_block_indexes if i < vision_depth - 1]
            vision.fullatt_block_indexes.append(vision_depth - 1)
        return cls(text=text, vision=vision, tie_word_embeddings=tie, torch_dtype="bfloat16")

    @classmethod
    def tiny(
        cls,
        model_type: str = "qwen2_5_vl",
        vocab_size: int = 1024,
        image_token_id: int = 4,
        vision_start_token_id: int = 2,
        vision_end_token_id: int = 3,
        video_token_id: int = 5,
        eos_token_id: int = 1,
        pad_token_id: int = 0,
        **overrides,
    ) -> "ModelConfig":
        """A tiny random-init-sized config (~1M parameters) for tests and the toy world.

        overrides: ModelConfig fields by name (tie_word_embeddings=False, bos_token_id=...), and
        sub-config fields prefixed with text_ / vision_ (text_num_hidden_layers=2, vision_depth=1).
        """
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[4, 6, 6],  # Qwen's [16, 24, 24] scaled to head_dim 32
            max_position_embeddings=4096,
        )
        vision = VisionConfig(
            depth=2,
            hidden_size=64,
            num_heads=4,
            intermediate_size=128,
            hidden_act="silu" if model_type == "qwen2_5_vl" else "quick_gelu",
            out_hidden_size=128,
        )
        if model_type == "qwen2_5_vl":
            vision.window_size = 56  # 2x2 merged tokens per window: windows matter already on 112x112 images
            vision.fullatt_block_indexes = [1]  # block 0 attends within windows, block 1 to the whole image
        top = dict(
            model_type=model_type,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            vision_start_token_id=vision_start_token_id,
            vision_end_token_id=vision_end_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=pad_token_id,  # Qwen's bos and pad are both <|endoftext|>
            tie_word_embeddings=True,
            torch_dtype="float32",
        )
        top_fields = {f.name for f in dataclasses.fields(cls)} - {"text", "vision"}
        for key, value in overrides.items():
            sub, _, name = key.partition("_")
            if key in top_fields:
                top[key] = value
            elif sub == "text" and hasattr(text, name) and name != "head_dim":
                setattr(text, name, value)
            elif sub == "vision" and hasattr(vision, name) and name != "head_dim":
                setattr(vision, name, value)
            else:
                raise TypeError(f"ModelConfig.tiny: unknown override {key!r}")
        return cls(text=text, vision=vision, **top)
