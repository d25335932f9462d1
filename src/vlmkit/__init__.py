"""vlmkit: build, train, evaluate and serve vision-language models.

    import vlmkit
    model = vlmkit.load("runs/demo/model")
    model.classify("cat.png", ["cat", "dog"])
"""
from vlmkit.inference.api import load
from vlmkit.presets import preset

__version__ = "0.1.0"
__all__ = ["load", "preset", "__version__"]
