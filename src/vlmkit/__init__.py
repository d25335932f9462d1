"""vlmkit: build, train, evaluate and serve vision-language models.

    import vlmkit
    clip = vlmkit.load("runs/demo/stage1/model")      # Stage 1: a dual encoder
    clip.classify("cat.png", ["cat", "dog"])
    vlm = vlmkit.load("runs/demo/stage2/model")       # Stage 2: a generative VLM
    vlm.ask("shapes.png", "What colour is the circle?")
"""
from vlmkit.runtime import VERSION as __version__

__all__ = ["load", "preset", "vlm_preset", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import vlmkit` (and every `vlmkit --help`) stays free of torch.
    if name == "load":
        from vlmkit.inference.api import load

        return load
    if name in ("preset", "vlm_preset"):
        from vlmkit import presets

        return getattr(presets, name)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
