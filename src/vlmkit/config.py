"""Typed, nested, validated configs with a JSON round trip.

Every config is a dataclass deriving from `Config`. `from_dict` rejects unknown keys
and values of the wrong type with a message naming the key; `__post_init__` checks
ranges. Nothing here knows about models: it only describes them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT_VERSION = 1
# Where an image goes in a conversation's text, and the token the LM's tokenizer gives it.
IMAGE_TOKEN = "<image>"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Coerce `value` to `hint` where lossless (int -> float, list -> tuple); else raise."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return hint.from_dict(value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


@dataclass
class Config:
    """Base class: dict/JSON round trip with strict key and type checks."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> "Config":
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(names)}")
        kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> "Config":
        return type(self).from_dict({**self.to_dict(), **changes})

    def override(self, dotted: dict[str, Any]) -> "Config":
        """Apply `{"train.lr": 1e-3, ...}` overrides, each checked like any other key."""
        data = self.to_dict()
        for key, value in dotted.items():
            node, parts = data, key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config section {part!r} in {key!r}")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node[parts[-1]] = value
        return type(self).from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        data.pop("format_version", None)
        return cls.from_dict(data, str(path))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class VisionConfig(Config):
    """A Vision Transformer: image -> sequence of patch tokens."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    class_token: bool = True
    norm_pre: bool = False          # CLIP normalises the embeddings before the blocks
    patch_bias: bool = True         # CLIP's patch convolution has no bias
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "width", "depth", "heads", "mlp_dim"):
            _require(getattr(self, name) > 0, f"vision.{name} must be positive")
        _require(self.image_size % self.patch_size == 0,
                 f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _require(self.width % self.heads == 0, f"vision.width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig(Config):
    """A transformer text encoder with learned positions, in one of two layouts.

    "bert": word + position + token-type embeddings, embedding LayerNorm, post-norm blocks
    (BERT / MiniLM). "pre_norm": word + position embeddings, pre-norm blocks, a final
    LayerNorm (CLIP's and SigLIP's text towers; type_vocab_size is unused there).
    """

    vocab_size: int = 30522
    width: int = 384
    depth: int = 6
    heads: int = 12
    mlp_dim: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    norm_eps: float = 1e-12
    max_length: int = 64            # captions are truncated to this many tokens
    layout: Literal["bert", "pre_norm"] = "bert"
    causal: bool = False            # CLIP's text tower: each token sees only the tokens before it
    # SigLIP was trained on text padded to a fixed length with the padding attended to like
    # any other token; False reproduces that (the mask passed to the encoder is then ignored).
    mask_padding: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "width", "depth", "heads", "mlp_dim", "max_positions", "max_length"):
            _require(getattr(self, name) > 0, f"text.{name} must be positive")
        _require(self.width % self.heads == 0, f"text.width {self.width} is not divisible by heads {self.heads}")
        _require(self.max_length <= self.max_positions,
                 f"text.max_length {self.max_length} exceeds max_positions {self.max_positions}")


@dataclass
class DualEncoderConfig(Config):
    """Two towers, each pooled and projected into one shared embedding space."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    # "map": SigLIP's attention-pooling head, which also serves as the image projection
    # (its output width is vision.width, so embed_dim must equal it).
    vision_pool: Literal["cls", "mean", "map"] = "cls"
    # "eos": the last real token by the mask; CLIP's tokenizer ends every text with its EOS
    # token and pads after it, so this is CLIP's EOS pooling. "last": the final position,
    # padding or not (SigLIP, whose texts are padded to a fixed length).
    text_pool: Literal["cls", "mean", "eos", "last"] = "mean"
    text_proj_bias: bool = False               # SigLIP's text head has a bias; CLIP's projection has none
    loss: Literal["infonce", "siglip"] = "infonce"
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)   # CLIP clamps the temperature at 100
    init_logit_bias: float = -10.0             # used by the SigLIP loss only

    def __post_init__(self) -> None:
        _require(self.embed_dim > 0, "embed_dim must be positive")
        _require(not (self.vision_pool == "cls" and not self.vision.class_token),
                 "vision_pool 'cls' needs vision.class_token = true")
        _require(not (self.vision_pool == "map" and self.embed_dim != self.vision.width),
                 f"vision_pool 'map' projects with its pooling head, whose output width is vision.width "
                 f"{self.vision.width}; set embed_dim to {self.vision.width} (got {self.embed_dim})")
        _require(not (self.text_pool == "cls" and self.text.causal),
                 "text_pool 'cls' with text.causal = true pools a token that sees only itself; use 'eos'")


@dataclass
class ImageDataConfig(Config):
    """How images become pixels: the fields Stage 1 and Stage 2 data share."""

    image_size: int | None = None          # default: the vision tower's
    resize_mode: Literal["squash", "shortest_crop", "pad"] = "squash"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_bad_fraction: float = 0.01         # fail when more images than this are unreadable

    def __post_init__(self) -> None:
        _require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]")


@dataclass
class DataConfig(ImageDataConfig):
    """Where the image-caption pairs come from."""

    source: str = "shapes"                 # a built-in source name or a path to your pairs
    train_split: str = "train"
    eval_split: str = "test"
    train_size: int | None = None          # use at most this many training pairs (generators: make this many)
    eval_size: int = 1000
    source_options: dict = field(default_factory=dict)  # extra keyword arguments for the source
    keep_classes: list[str] | None = None  # train only on these classes (held-out-class tests)
    # Stream the training pairs from webdataset shards (a folder `vlmkit data pack` wrote)
    # instead of decoding `source` into memory; `source` still gives the evaluation split.
    shards: str | None = None
    workers: int = 1                       # shard reader processes per training process (0: in it)
    shuffle_buffer: int = 1000             # samples each shard reader shuffles among

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.eval_size > 0, "data.eval_size must be positive")
        _require(self.workers >= 0 and self.shuffle_buffer > 0, "data.workers must be >= 0, data.shuffle_buffer > 0")


@dataclass
class TrainConfig(Config):
    """How to optimise: steps, batch, schedule, precision, checkpoints."""

    steps: int = 1000
    batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta2: float = 0.98
    clip_grad: float = 1.0
    # "auto": bf16 autocast on a GPU that supports it, fp32 elsewhere (CPUs without native
    # bf16 matrix units, like this project's CI machines, run bf16 through slow emulation).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0             # 0: evaluate at the end only
    save_every: int = 200
    keep_checkpoints: int = 2
    # Under torchrun: "ddp" copies the whole model to every process; "fsdp" shards weights,
    # gradients and optimizer state across them (FSDP2). One process ignores it.
    distributed: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_checkpoints"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive")
        _require(self.lr > 0, "train.lr must be positive")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]")
        _require(self.warmup_steps >= 0 and self.eval_every >= 0, "train.warmup_steps/eval_every must be >= 0")


@dataclass
class ClipTrainConfig(TrainConfig):
    """Stage 1 training: the optimisation of `TrainConfig`, and what only contrastive runs have."""

    lock_text: bool = False         # LiT: keep the (pretrained) text tower frozen
    lock_vision: bool = False
    text_init: str | None = None    # a BERT directory to start the text tower from
    # "dihedral": each training image is randomly flipped and transposed (the 8 symmetries of
    # a square); only for data whose captions never name a side or position.
    augment: Literal["none", "dihedral"] = "none"
    # Other pairs with the very same caption are not negatives (InfoNCE) or count as matches
    # (SigLIP). For data with few distinct captions.
    dedupe_captions: bool = False
    # Each image is also contrasted with a caption one edit away from its own (another shape,
    # colour or place for one object; NegCLIP's hard negatives). Without them in-batch
    # negatives are told apart by colour and place alone, and shape is coded weakly.
    # Needs a source that can make them (`shapes`).
    hard_negatives: bool = False


@dataclass
class ClipRunConfig(Config):
    """Everything a Stage 1 (contrastive) run needs."""

    model: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)


# ----------------------------------------------------------------------------- Stage 2
@dataclass
class DecoderConfig(Config):
    """A Llama-compatible decoder-only language model (RMSNorm, RoPE, SwiGLU, GQA)."""

    vocab_size: int = 49152
    width: int = 576
    depth: int = 30
    heads: int = 9
    kv_heads: int = 3               # grouped-query attention: kv_heads divides heads
    head_dim: int | None = None     # default width // heads
    mlp_dim: int = 1536
    max_positions: int = 2048       # context length; the KV cache is allocated up to this
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False    # Qwen2 puts biases on the Q, K, V projections
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "width", "depth", "heads", "kv_heads", "mlp_dim", "max_positions"):
            _require(getattr(self, name) > 0, f"decoder.{name} must be positive")
        _require(self.heads % self.kv_heads == 0,
                 f"decoder.heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim is None:
            _require(self.width % self.heads == 0,
                     f"decoder.width {self.width} is not divisible by heads {self.heads}; set head_dim")
            self.head_dim = self.width // self.heads
        _require(self.head_dim % 2 == 0, f"decoder.head_dim {self.head_dim} must be even for RoPE")


@dataclass
class ProjectorConfig(Config):
    """How ViT patch tokens become LM input embeddings."""

    kind: Literal["mlp", "pixel_shuffle", "resampler"] = "mlp"
    hidden: int | None = None       # MLP hidden width; default the LM width
    shuffle_factor: int = 2         # pixel_shuffle: merge factor x factor patches into one token
    queries: int = 64               # resampler: number of learned queries (= image tokens)
    heads: int = 8                  # resampler: cross-attention heads
    # One bias-free Linear in place of the MLP (Idefics3 / SmolVLM's connector after the shuffle).
    linear: bool = False
    # EXPERIMENTAL, for the 3x3 `shapes` preset (docs/shapes-recipe.md); LLaVA export refuses it.
    # A learned vector per image-token slot, added to the projector's output: the LM can then
    # tell which patch a token came from by what it holds, not only by where it sits.
    position_embedding: bool = False

    def __post_init__(self) -> None:
        _require(self.shuffle_factor >= 1 and self.queries >= 1 and self.heads >= 1,
                 "projector.shuffle_factor, queries and heads must be positive")


@dataclass
class VLMConfig(Config):
    """Vision tower + projector + decoder LM (the LLaVA recipe)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Which ViT layer feeds the projector: a block's raw output (LLaVA's feature layer), or
    # None for the tower's final, normalised tokens (SigLIP's last_hidden_state, which
    # Idefics3 / SmolVLM read).
    vision_layer: int | None = -1
    vision_select: Literal["patch", "all"] = "patch"   # "patch" drops the class token (LLaVA's "default")
    # How each image placeholder becomes tokens. "slots": `image_tokens` image-token slots.
    # "idefics3": Idefics3 / SmolVLM's layout for an image split into tiles (see
    # data/image_prompt.py): per tile <fake_token_around_image><row_r_col_c> and its slots,
    # then the global view after <global-img>.
    image_prompt: Literal["slots", "idefics3"] = "slots"
    image_token: str = IMAGE_TOKEN
    image_token_id: int = -1                           # set from the tokenizer when the model is built
    # "sequential": LLaVA's layout, one position per token. "shared" is EXPERIMENTAL, for the
    # 3x3 `shapes` preset (docs/shapes-recipe.md), and LLaVA export refuses it: all tokens of
    # one image take the rotary position of its first token (text keeps counting as usual), so
    # the LM tells them apart by content alone (use with projector.position_embedding).
    image_positions: Literal["sequential", "shared"] = "sequential"

    def __post_init__(self) -> None:
        _require(self.vision_layer is None or -self.vision.depth <= self.vision_layer < self.vision.depth,
                 f"vision_layer {self.vision_layer} is outside a {self.vision.depth}-layer vision tower")
        p = self.projector
        if p.kind == "pixel_shuffle":
            _require(self.vision_select == "patch", "pixel_shuffle needs vision_select 'patch' (a square grid)")
            _require(self.vision.grid % p.shuffle_factor == 0,
                     f"vision grid {self.vision.grid} is not divisible by projector.shuffle_factor {p.shuffle_factor}")

    @property
    def image_tokens(self) -> int:
        """How many LM positions one image takes."""
        p, grid = self.projector, self.vision.grid
        if p.kind == "resampler":
            return p.queries
        if p.kind == "pixel_shuffle":
            return (grid // p.shuffle_factor) ** 2
        return grid * grid + (1 if self.vision_select == "all" and self.vision.class_token else 0)


@dataclass
class PhaseConfig(Config):
    """One Stage 2 training phase: what trains, on which tasks, for how long."""

    train: TrainConfig = field(default_factory=TrainConfig)
    vision: Literal["frozen", "full"] = "frozen"
    vision_lr: float | None = None          # default: train.lr
    projector: Literal["frozen", "full"] = "full"
    language_model: Literal["frozen", "full", "lora"] = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # Fold the LoRA adapters into the LM's weights when the phase ends. False keeps them apart
    # in the saved model (`vlmkit merge` folds them later; loading and exporting merge them).
    merge_lora: bool = True
    tasks: list[str] | None = None          # question kinds to train on; None = all
    # Oversampling: conversations of these kinds appear this many times per epoch (others once).
    task_repeats: dict = field(default_factory=dict)
    skip: bool = False

    def __post_init__(self) -> None:
        _require(self.lora_rank > 0, "lora_rank must be positive")
        _require(all(isinstance(n, int) and n >= 1 for n in self.task_repeats.values()),
                 f"task_repeats must map question kinds to whole numbers >= 1, got {self.task_repeats}")


@dataclass
class VlmDataConfig(ImageDataConfig):
    """Conversations for Stage 2: a built-in task set or a LLaVA JSON file."""

    source: str = "shapes"                 # shapes | easy_vqa | path to a LLaVA .json/.jsonl
    image_folder: str | None = None        # LLaVA JSON: where image paths resolve (default: beside the file)
    eval_source: str | None = None         # LLaVA JSON for evaluation (default: the source's test split)
    train_size: int | None = None          # images (scenes) to use for training
    eval_size: int = 500                   # images to evaluate on
    source_options: dict = field(default_factory=dict)
    max_length: int = 128                  # tokens per conversation, image slots included
    # Training conversations ask up to this many questions about their image, one per turn
    # (captions stay alone); evaluation always asks one. See vqa_sets.merge_turns.
    train_turns: int = 1
    # Image splitting (Idefics3 / SmolVLM's scheme), so a small tower reads large images: the
    # longest side goes to this many pixels, the image is cut into tiles of the tower's size
    # and followed by a global view; the prompt marks each tile's row and column (the model's
    # image_prompt becomes "idefics3"). An image then costs (rows x cols + 1) x image_tokens
    # tokens plus the markers. None: one view per image.
    split_longest_edge: int | None = None
    # Text replay, for a pretrained LM: this many plain-text conversations (data/text_replay.py)
    # whose answers the LM itself writes before training (greedy, up to text_replay_tokens,
    # cut at the last full sentence) join the training data as kind "text", so it keeps its
    # language while learning short visual answers (oversample them with task_repeats).
    text_replay: int = 0
    text_replay_tokens: int = 48

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.max_length > 0 and self.eval_size > 0, "data.max_length and eval_size must be positive")
        _require(self.train_turns >= 1, "data.train_turns must be >= 1")
        _require(self.split_longest_edge is None or self.split_longest_edge > 0,
                 "data.split_longest_edge must be positive (or null: no splitting)")
        _require(self.text_replay >= 0 and self.text_replay_tokens > 0,
                 "data.text_replay must be >= 0 and data.text_replay_tokens > 0")


@dataclass
class VlmRunConfig(Config):
    """Everything a Stage 2 run needs: the model, its starting points, the data, both phases."""

    model: VLMConfig = field(default_factory=VLMConfig)
    data: VlmDataConfig = field(default_factory=VlmDataConfig)
    # A whole VLM to fine-tune: a vlmkit VLM checkpoint or a Hugging Face LLaVA / SmolVLM
    # directory. Its model config (which replaces `model`), weights, tokenizer and image
    # preprocessing are used as they are; vision_init, lm_init and data.split_longest_edge
    # must stay unset.
    init: str | None = None
    vision_init: str | None = None         # a Stage 1 checkpoint directory (its vision tower is used)
    # "smollm2", a .gguf file, a Hugging Face Llama/Qwen2 directory or a vlmkit decoder
    # checkpoint (`vlmkit convert`); None: train a small LM from scratch
    lm_init: str | None = None
    tokenizer_vocab: int = 1000            # from-scratch LM: size of the BPE vocabulary trained on the data
    align: PhaseConfig = field(default_factory=lambda: PhaseConfig(language_model="frozen", tasks=["caption"]))
    instruct: PhaseConfig = field(default_factory=PhaseConfig)
