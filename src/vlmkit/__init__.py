"""vlmkit: build, train, evaluate and serve vision-language models.

    import vlmkit
    clip = vlmkit.load("runs/demo/stage1/model")      # Stage 1: a dual encoder
    clip.classify("cat.png", ["cat", "dog"])
    vlm = vlmkit.load("runs/demo/stage2/model")       # Stage 2: a generative VLM
    vlm.ask("shapes.png", "What colour is the circle?")
"""
from vlmkit.inference.api import load
from vlmkit.presets import preset, vlm_preset
from vlmkit.runtime import VERSION as __version__

__all__ = ["load", "preset", "vlm_preset", "__version__"]
