"""Configs of Qwen2-VL / Qwen2.5-VL / Qwen3-VL: `Family`, `VisionConfig`, `TextConfig`, `ModelConfig`.

One model serves the three generations: `FAMILIES` lists, per model_type, the few components in which they differ
(vision.py and model.py pick theirs from `config.family`); the numbers of a checkpoint are the two sub-configs.
`ModelConfig.from_hf_dict` reads the hub's config.json layouts and the nested one transformers 5 writes;
`to_hf_dict` writes the nested layout. `ModelConfig.tiny` is the ~1M-parameter config of the tests and the toy world;
`ModelConfig.qwen2_5_vl("3b" | "7b")` and `ModelConfig.qwen3_vl("2b" | "4b" | "8b")` give the released
checkpoints' widths (random weights: benches, memory plans).
"""

import copy
import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """The components in which the Qwen-VL generations differ; everything not named here is shared."""

    architecture: str  # transformers' class, written into config.json
    vision_block: str  # "clip": LayerNorm, fc1 -> act -> fc2 | "swiglu": RMSNorm, SwiGLU | "linear_fc": LayerNorm,
    #                    linear_fc1 -> act -> linear_fc2 (the patch merger follows the same norm and names)
    vision_windows: bool  # windowed attention except at fullatt_block_indexes
    position_grid: bool  # a learned absolute position grid, resampled to each image, and a bias in the patch embedding
    qkv_bias: bool  # biases on the decoder's q/k/v projections
    qk_norm: bool  # per-head RMSNorm on q and k before rotary
    text_prefix: str  # where the checkpoint's decoder tensors live (model.embed_tokens.weight, ...)
    vision_prefix: str


LEGACY_NAMES = dict(text_prefix="model.", vision_prefix="visual.")  # the hub's Qwen2/2.5-VL files (transformers 5 too)
FAMILIES = {
    "qwen2_vl": Family("Qwen2VLForConditionalGeneration", vision_block="clip", vision_windows=False,
                       position_grid=False, qkv_bias=True, qk_norm=False, **LEGACY_NAMES),
    "qwen2_5_vl": Family("Qwen2_5_VLForConditionalGeneration", vision_block="swiglu", vision_windows=True,
                         position_grid=False, qkv_bias=True, qk_norm=False, **LEGACY_NAMES),
    # Qwen3-VL also adds DeepStack (VisionConfig.deepstack_visual_indexes) and interleaved MRoPE
    # (TextConfig.mrope_interleaved): numbers in its config.json, checked below to be off for the others.
    "qwen3_vl": Family("Qwen3VLForConditionalGeneration", vision_block="linear_fc", vision_windows=False,
                       position_grid=True, qkv_bias=False, qk_norm=True, text_prefix="model.language_model.",
                       vision_prefix="model.visual."),
}
MODEL_TYPES = tuple(FAMILIES)
# Known relatives this code does not implement: named, so that loading one stops before any weight is read.
UNSUPPORTED_MODEL_TYPES = {"qwen3_vl_moe": "Qwen3-VL-MoE (a mixture-of-experts decoder)"}


def _check_model_type(model_type, where: str) -> None:
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where}: {UNSUPPORTED_MODEL_TYPES[model_type]}, model_type {model_type!r}, is not supported "
                         f"(supported: {MODEL_TYPES})")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{where}: model_type must be one of {MODEL_TYPES}, got {model_type!r}")


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
    num_position_embeddings: int = 0  # Qwen3 only: the learned position grid, side x side entries (48 x 48)
    deepstack_visual_indexes: list[int] = field(default_factory=list)  # Qwen3 only: the blocks DeepStack reads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    """The Qwen2 / Qwen3 decoder."""

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
    mrope_interleaved: bool = False  # Qwen3: the axes alternate pair by pair (t h w t h w ...) instead of in blocks
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02
    head_dim: int | None = None  # Qwen3 has its own key; None (Qwen2): hidden_size / num_attention_heads

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


# The released checkpoints' decoders (the vision tower is the same in both): (TextConfig fields, tie_word_embeddings).
QWEN2_5_VL_TEXT = {
    "3b": (dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2), True),
    "7b": (dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4), False),
}
# Qwen3-VL-2B/4B/8B-Instruct: (TextConfig fields, VisionConfig fields, tie_word_embeddings). The hub's config.json
# files cannot be downloaded here: these values are written from their published contents as we know them
# (transformers' Qwen3VLConfig defaults are the 8B's vision tower); tests/test_model.py checks that transformers
# builds the same tensors from them, not that they are the hub's numbers.
QWEN3_VL_TOWER_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17])
QWEN3_VL = {
    "2b": (dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8), QWEN3_VL_TOWER_SMALL, True),
    "4b": (dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8), QWEN3_VL_TOWER_SMALL, True),
    "8b": (dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8),
           dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24]), False),
}
# What all three share: a 128-wide head, interleaved MRoPE [24, 20, 20] at theta 5e6, 16-pixel patches, a 48 x 48
# learned position grid and the tanh GELU in the vision tower.
QWEN3_VL_TEXT_COMMON = dict(vocab_size=151936, head_dim=128, rope_theta=5000000.0, mrope_section=[24, 20, 20],
                            mrope_interleaved=True, max_position_embeddings=262144)
QWEN3_VL_VISION_COMMON = dict(num_heads=16, hidden_act="gelu_pytorch_tanh", patch_size=16,
                              num_position_embeddings=2304, fullatt_block_indexes=[])


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

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def validate(self) -> None:
        text, vision = self.text, self.vision
        _check_model_type(self.model_type, "ModelConfig")
        qwen3 = self.model_type == "qwen3_vl"
        if text.num_attention_heads % text.num_key_value_heads:
            raise ValueError(f"TextConfig: num_attention_heads {text.num_attention_heads} must divide into "
                             f"num_key_value_heads {text.num_key_value_heads}")
        if not qwen3 and text.head_dim * text.num_attention_heads != text.hidden_size:
            raise ValueError(
                f"TextConfig: {self.model_type} needs head_dim * num_attention_heads = hidden_size, got "
                f"{text.head_dim} * {text.num_attention_heads} != {text.hidden_size}"
            )
        pairs = text.head_dim // 2
        if len(text.mrope_section) != 3 or sum(text.mrope_section) != pairs:
            raise ValueError(
                f"TextConfig.mrope_section {text.mrope_section} must be 3 numbers summing to head_dim/2 = {pairs}"
            )
        if text.mrope_interleaved and 3 * max(text.mrope_section[1:]) > pairs:
            raise ValueError(f"TextConfig.mrope_section {text.mrope_section}: interleaved, the h and w pairs must fit "
                             f"into every third of the {pairs} frequency pairs")
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
        if self.family.vision_windows and vision.window_size % merger_window:
            raise ValueError(
                f"VisionConfig.window_size {vision.window_size} must be a multiple of patch_size*spatial_merge_size "
                f"= {merger_window}"
            )
        side = round(vision.num_position_embeddings**0.5)
        if self.family.position_grid and (side < 2 or side * side != vision.num_position_embeddings):
            raise ValueError(f"VisionConfig.num_position_embeddings {vision.num_position_embeddings} must be a "
                             f"square of a side >= 2 (the learned position grid)")
        indexes = vision.deepstack_visual_indexes
        if sorted(set(indexes)) != list(indexes) or any(not 0 <= i < vision.depth for i in indexes):
            raise ValueError(f"VisionConfig.deepstack_visual_indexes {indexes} must be increasing block indexes "
                             f"below depth {vision.depth}")
        if not qwen3 and (indexes or text.mrope_interleaved):
            raise ValueError(f"{self.model_type} has neither DeepStack nor interleaved MRoPE (Qwen3-VL only)")

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict: the hub's layouts or transformers-5's nested one.

        Qwen2/2.5-VL were released flat (text fields at the top, rope_scaling), Qwen3-VL nested with rope_scaling and
        rope_theta in text_config; transformers 5 writes nested files with rope_parameters.
        """
        model_type = d.get("model_type")
        _check_model_type(model_type, "config.json")
        text_d = d.get("text_config") or d  # nested or flat (hub legacy)
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
        if rope.get("rope_type", "default") not in ("default", "mrope"):
            raise ValueError(f"config.json: rope_type {rope['rope_type']!r} is not supported (only Qwen's plain MRoPE)")
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
            mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
            max_position_embeddings=text_d.get("max_position_embeddings", 32768),
            initializer_range=text_d.get("initializer_range", 0.02),
            head_dim=text_d.get("head_dim"),
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
        elif model_type == "qwen2_5_vl":
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
        else:
            vision = VisionConfig(
                hidden_size=vision_d["hidden_size"],
                intermediate_size=vision_d["intermediate_size"],
                hidden_act=vision_d.get("hidden_act", "gelu_pytorch_tanh"),
                out_hidden_size=vision_d.get("out_hidden_size", text.hidden_size),
                fullatt_block_indexes=[],
                num_position_embeddings=vision_d.get("num_position_embeddings", 2304),
                deepstack_visual_indexes=list(vision_d.get("deepstack_visual_indexes", [])),
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
        rope = {"rope_type": "default", "type": "mrope", "mrope_section": list(text.mrope_section),
                "rope_theta": text.rope_theta}
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
            "rope_parameters": rope,
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
            )
        if self.model_type == "qwen3_vl":
            text_d.update(head_dim=text.head_dim, attention_bias=False)
            rope.update(mrope_interleaved=text.mrope_interleaved)
            del rope["type"]
            vision_d.update(num_position_embeddings=vision.num_position_embeddings,
                            deepstack_visual_indexes=list(vision.deepstack_visual_indexes))
        else:
            text_d["use_sliding_window"] = False
        if self.model_type == "qwen2_5_vl":
            vision_d.update(
                window_size=vision.window_size,
                fullatt_block_indexes=list(vision.fullatt_block_indexes),
                tokens_per_second=vision.tokens_per_second,
            )
        return {
            "architectures": [self.family.architecture],
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
    def qwen3_vl(cls, size: str, layers: int | None = None, vision_depth: int | None = None) -> "ModelConfig":
        """The widths of Qwen3-VL-2B/4B/8B-Instruct (see QWEN3_VL); layers / vision_depth cut the depth to fit a CPU.

        A cut vision tower feeds DeepStack from its first blocks, one per DeepStack merger that fits.
        """
        if size not in QWEN3_VL:
            raise ValueError(f"ModelConfig.qwen3_vl: size must be one of {sorted(QWEN3_VL)}, got {size!r}")
        text_fields, vision_fields, tie = copy.deepcopy(QWEN3_VL[size])  # the tables' lists stay untouched
        text = TextConfig(**text_fields, **copy.deepcopy(QWEN3_VL_TEXT_COMMON))
        vision = VisionConfig(**vision_fields, **copy.deepcopy(QWEN3_VL_VISION_COMMON),
                              out_hidden_size=text.hidden_size)
        if layers is not None:
            text.num_hidden_layers = layers
        if vision_depth is not None:
            vision.depth = vision_depth
            vision.deepstack_visual_indexes = list(range(min(vision_depth, len(vision.deepstack_visual_indexes))))
        return cls(model_type="qwen3_vl", text=text, vision=vision, tie_word_embeddings=tie, torch_dtype="bfloat16")

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
        text = dict(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[4, 6, 6],  # Qwen's [16, 24, 24] scaled to head_dim 32
            max_position_embeddings=4096,
        )
        vision = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=128,
                      hidden_act={"qwen2_vl": "quick_gelu", "qwen2_5_vl": "silu"}.get(model_type, "gelu_pytorch_tanh"))
        if model_type == "qwen2_5_vl":
            vision.update(
                window_size=56,  # 2x2 merged tokens per window: windows matter already on 112x112 images
                fullatt_block_indexes=[1],  # block 0 attends within windows, block 1 to the whole image
            )
        if model_type == "qwen3_vl":
            # head_dim 48 != hidden_size / heads, as in Qwen3-VL-4B (2560 / 32 = 80, head_dim 128).
            text.update(head_dim=48, mrope_section=[10, 7, 7], mrope_interleaved=True, rope_theta=5000000.0)
            vision.update(
                depth=3,
                patch_size=16,
                fullatt_block_indexes=[],
                num_position_embeddings=16,  # a 4 x 4 grid: every image's grid differs from it and is resampled
                deepstack_visual_indexes=[0, 1],  # into decoder layers 0 and 1
            )
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
        sub_fields = {"text": {f.name for f in dataclasses.fields(TextConfig)},
                      "vision": {f.name for f in dataclasses.fields(VisionConfig)}}
        subs = {"text": text, "vision": vision}
        for key, value in overrides.items():
            sub, _, name = key.partition("_")
            if key in top_fields:
                top[key] = value
            elif name in sub_fields.get(sub, ()):
                subs[sub][name] = value
            else:
                raise TypeError(f"ModelConfig.tiny: unknown override {key!r}")
        return cls(text=TextConfig(**text), vision=VisionConfig(**vision), **top)
