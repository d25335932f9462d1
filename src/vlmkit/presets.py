"""Named presets: a model shape plus the data and training defaults that go with it."""
from __future__ import annotations

from typing import Callable

from vlmkit.config import ClipRunConfig, ConfigError, VlmRunConfig


def _tiny() -> dict:
    """Seconds on a CPU: for tests."""
    return {
        "model": {
            "vision": {"image_size": 48, "patch_size": 16, "width": 64, "depth": 2, "heads": 4, "mlp_dim": 128},
            "text": {"vocab_size": 400, "width": 64, "depth": 2, "heads": 4, "mlp_dim": 128,
                     "max_positions": 64, "max_length": 32},
            "embed_dim": 64,
            "vision_pool": "cls",
        },
        "data": {"source": "shapes", "train_size": 2000, "eval_size": 200, "source_options": {"image_size": 48}},
        "train": {"steps": 150, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10, "save_every": 75,
                  "log_every": 5},
    }


def _shapes() -> dict:
    """The demo: about 5 minutes on a 2-core CPU to R@1 > 0.9 on the shapes world."""
    return {
        "model": {
            # 48 px images in 16 px patches: one patch per cell of the world's 3x3 grid.
            "vision": {"image_size": 48, "patch_size": 16, "width": 128, "depth": 4, "heads": 4, "mlp_dim": 512,
                       "class_token": False},
            "text": {"vocab_size": 400, "width": 128, "depth": 2, "heads": 4, "mlp_dim": 512,
                     "max_positions": 64, "max_length": 40},
            "embed_dim": 128,
            # Mean pooling puts the contrastive loss on every patch token, the tokens Stage 2 reads
            # (they still carry the other objects too: experiments/lookup_tokens.py); on a class-token tower
            # Stage 2 read the wrong object's colour more often.
            "vision_pool": "mean",
        },
        "data": {"source": "shapes", "train_size": 60000, "eval_size": 1000, "source_options": {"image_size": 48}},
        # Hard negatives (each caption with one shape, colour, size or place wrong) make the
        # tower tell shapes apart, not only colours and places; Stage 2 answers better for it.
        "train": {"steps": 800, "batch_size": 256, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.05,
                  "save_every": 200, "eval_every": 400, "hard_negatives": True},
    }


def _fashion_mnist() -> dict:
    """Contrastive training on Fashion-MNIST captions; zero-shot classification by prompts."""
    return {
        "model": {
            "vision": {"image_size": 28, "patch_size": 7, "width": 128, "depth": 4, "heads": 4, "mlp_dim": 512},
            "text": {"vocab_size": 400, "width": 128, "depth": 2, "heads": 4, "mlp_dim": 512,
                     "max_positions": 64, "max_length": 32},
            "embed_dim": 128,
            "vision_pool": "mean",
        },
        "data": {"source": "fashion_mnist", "eval_size": 10000},
        "train": {"steps": 1200, "batch_size": 256, "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.05,
                  "save_every": 400},
    }


def _fashion_mnist_lit() -> dict:
    """LiT: the real all-MiniLM-L6-v2 text tower, locked; only the image tower learns."""
    cfg = _fashion_mnist()
    cfg["model"]["text"] = {"max_length": 32}
    cfg["train"].update({"text_init": "minilm", "lock_text": True})
    return cfg


def _easy_vqa() -> dict:
    """Contrastive training on Easy-VQA images with captions derived from their answers.

    Only 4,000 training images and 24 distinct captions: 8 px patches (16 px ones blur a
    circle into a rectangle), flips and transposes of the images (questions never name a
    side), and identical captions kept out of each other's negatives.
    """
    return {
        "model": {
            "vision": {"image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 4, "mlp_dim": 512,
                       "class_token": False},
            "text": {"vocab_size": 200, "width": 128, "depth": 2, "heads": 4, "mlp_dim": 512,
                     "max_positions": 32, "max_length": 16},
            "embed_dim": 128,
            # Mean pooling puts the contrastive loss on every patch token, the tokens Stage 2
            # reads; with a class token the last layer's patch outputs get no training signal.
            "vision_pool": "mean",
        },
        "data": {"source": "easy_vqa", "eval_size": 500},
        "train": {"steps": 1500, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50, "weight_decay": 0.05,
                  "save_every": 250, "augment": "dihedral", "dedupe_captions": True},
    }


def _clip_vit_b32() -> dict:
    """The shape of OpenAI's CLIP ViT-B/32 (image tower exact; text tower BERT-style, same size)."""
    return {
        "model": {
            "vision": {"image_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12,
                       "mlp_dim": 3072, "norm_pre": True, "patch_bias": False, "act": "quick_gelu",
                       "norm_eps": 1e-5},
            "text": {"vocab_size": 49408, "width": 512, "depth": 12, "heads": 8, "mlp_dim": 2048,
                     "max_positions": 77, "max_length": 77, "act": "quick_gelu", "norm_eps": 1e-5},
            "embed_dim": 512,
            "vision_pool": "cls",
        },
        "data": {"source": "shapes", "resize_mode": "shortest_crop",
                 "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
        "train": {"batch_size": 256, "lr": 5e-4},
    }


def _siglip_b16() -> dict:
    """The shape of SigLIP B/16 at 224 px, with the sigmoid loss."""
    return {
        "model": {
            "vision": {"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12,
                       "mlp_dim": 3072, "class_token": False, "act": "gelu_tanh"},
            "text": {"vocab_size": 32000, "width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072,
                     "max_positions": 64, "max_length": 64, "act": "gelu_tanh", "norm_eps": 1e-6},
            "embed_dim": 768,
            "vision_pool": "mean",
            "loss": "siglip",
            "init_logit_scale": 2.302585,
        },
        "data": {"source": "shapes"},
        "train": {"batch_size": 256, "lr": 5e-4},
    }


PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": _tiny,
    "shapes": _shapes,
    "fashion-mnist": _fashion_mnist,
    "fashion-mnist-lit": _fashion_mnist_lit,
    "easy-vqa": _easy_vqa,
    "clip-vit-b32": _clip_vit_b32,
    "siglip-b16": _siglip_b16,
}


# ----------------------------------------------------------------------------- Stage 2
_SHAPES_VISION = _shapes()["model"]["vision"]


def _vlm_tiny() -> dict:
    """Stage 2 in seconds on a CPU: for tests."""
    return {
        "model": {"vision": _tiny()["model"]["vision"],
                  "decoder": {"width": 64, "depth": 2, "heads": 4, "kv_heads": 2, "mlp_dim": 128,
                              "max_positions": 128}},
        "data": {"source": "shapes", "train_size": 300, "eval_size": 20,
                 "source_options": {"image_size": 48, "max_objects": 2}},
        "tokenizer_vocab": 400,
        "align": {"train": {"steps": 10, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 5,
                            "save_every": 10}, "language_model": "full", "vision": "full", "tasks": ["caption"]},
        "instruct": {"train": {"steps": 20, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 5,
                               "save_every": 10}, "vision": "full"},
    }


def _vlm_shapes() -> dict:
    """The demo's Stage 2: a small LM learns to caption, answer and ground on the shapes world.

    Start from a Stage 1 `shapes` checkpoint (`vision_init`); the LM is trained from scratch,
    so the align phase trains it on captions together with the projector.
    """
    return {
        # Four choices that together scored higher in 1,600-step trials on the shapes questions
        # (the first two helped only together):
        # - the tower's second block (vision_layer -3): its tokens hold their own cell's object
        #   more than the other objects (experiments/lookup_tokens.py), and two blocks less to run;
        # - init_std 1/sqrt(width), not Llama's 0.02: a from-scratch LM learns lookups sooner
        #   (experiments/lm_lookup.py);
        # - EXPERIMENTAL (this 3x3 world's options, which LLaVA export refuses; docs/shapes-recipe.md):
        #   a learned vector per image slot, so a token's content says which cell it is;
        # - EXPERIMENTAL likewise: one rotary position for all of an image's tokens. With one
        #   each, the LM named places by counting positions and never learned to read a found
        #   object's place from its content: "where is the red circle?" got the same answer
        #   whichever object was named.
        "model": {"vision": _SHAPES_VISION, "vision_layer": -3, "projector": {"position_embedding": True},
                  "image_positions": "shared",
                  "decoder": {"width": 192, "depth": 3, "heads": 4, "kv_heads": 2, "mlp_dim": 512,
                              "max_positions": 128, "init_std": 192 ** -0.5}},
        "data": {"source": "shapes", "train_size": 24000, "eval_size": 500,
                 "source_options": {"image_size": 48, "max_objects": 3}},
        "tokenizer_vocab": 600,
        "align": {"train": {"steps": 150, "batch_size": 64, "lr": 2e-3, "warmup_steps": 20, "save_every": 100},
                  "language_model": "full", "tasks": ["caption"]},
        # The tower fine-tunes with the LM, at a fifth of its learning rate. The kinds that need
        # the most lookups come more than once per epoch: at one share the LM named the right
        # cell but guessed where a small object lay inside it (grounding), often answered
        # "what shape is at P?" about another object, and did worst on relations (docs/shapes-recipe.md).
        # The larger shares crowd the other kinds, hence more steps. "order" (name the shapes
        # from left to right; not in the VQA figure) teaches columns as captions, in reading
        # order, teach rows: without it the LM answered "is A left of B?" by whether A and B
        # share a row (experiments/stage2_relations.py).
        "instruct": {"train": {"steps": 8000, "batch_size": 64, "lr": 1.5e-3, "warmup_steps": 50,
                               "weight_decay": 0.05, "save_every": 500, "eval_every": 1000},
                     "vision": "full", "vision_lr": 3e-4,
                     "task_repeats": {"grounding": 3, "relation": 4, "shape": 3, "order": 2}},
    }


def _vlm_easy_vqa() -> dict:
    """Easy-VQA (64 px shapes, 13 answers): a small LM from scratch on a Stage 1 `easy-vqa` tower.

    Pixel shuffle merges the tower's 8x8 patch grid into 16 LM tokens.
    """
    return {
        "model": {"vision": _easy_vqa()["model"]["vision"],
                  "projector": {"kind": "pixel_shuffle", "shuffle_factor": 2},
                  "decoder": {"width": 192, "depth": 3, "heads": 4, "kv_heads": 2, "mlp_dim": 512,
                              "max_positions": 96}},
        "data": {"source": "easy_vqa", "eval_size": 1000},
        "tokenizer_vocab": 300,
        "align": {"skip": True},
        "instruct": {"train": {"steps": 1500, "batch_size": 64, "lr": 1.5e-3, "warmup_steps": 50,
                               "weight_decay": 0.05, "save_every": 250, "eval_every": 500}},
    }


def _llava_smol() -> dict:
    """A real brain: a Stage 1 vision tower + projector + SmolLM2-135M-Instruct (LoRA).

    The projector and LoRA adapters train (the LM's own weights stay as they are); set
    `vision_init` to a Stage 1 checkpoint. Questions end with "Answer with one word." (as
    LLaVA-1.5 asks for short answers) and 400 plain-text conversations answered by the LM
    itself are mixed in (text replay), so it keeps answering plain questions as it did.
    """
    return {
        "model": {"vision": _easy_vqa()["model"]["vision"],
                  "projector": {"kind": "pixel_shuffle", "shuffle_factor": 2},  # 16 image tokens
                  "decoder": {"max_positions": 256}},
        "lm_init": "smollm2",
        "data": {"source": "easy_vqa", "source_options": {"instruction": "Answer with one word."},
                 "eval_size": 1000, "max_length": 160, "text_replay": 400, "text_replay_tokens": 32},
        "align": {"skip": True},
        "instruct": {"train": {"steps": 600, "batch_size": 16, "lr": 1e-3, "warmup_steps": 30,
                               "save_every": 100, "log_every": 20, "eval_every": 0},
                     "language_model": "lora", "lora_rank": 16, "lora_alpha": 32, "task_repeats": {"text": 2}},
    }


VLM_PRESETS: dict[str, Callable[[], dict]] = {
    "tiny": _vlm_tiny,
    "shapes": _vlm_shapes,
    "easy-vqa": _vlm_easy_vqa,
    "llava-smol": _llava_smol,
}


def preset(name: str) -> ClipRunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return ClipRunConfig.from_dict(PRESETS[name](), f"preset {name}")


def vlm_preset(name: str) -> VlmRunConfig:
    if name not in VLM_PRESETS:
        raise ConfigError(f"unknown Stage 2 preset {name!r}; available: {', '.join(VLM_PRESETS)}")
    return VlmRunConfig.from_dict(VLM_PRESETS[name](), f"vlm preset {name}")


def describe_presets() -> list[tuple[str, str]]:
    return [(name, (fn.__doc__ or "").strip()) for name, fn in PRESETS.items()]


def describe_vlm_presets() -> list[tuple[str, str]]:
    return [(name, (fn.__doc__ or "").strip()) for name, fn in VLM_PRESETS.items()]
