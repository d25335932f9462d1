"""Checkpoint formats in and out: one module per source format, `auto.convert` picks one.

    from vlmkit.convert import convert
    convert("path/to/llava-hf-dir", "runs/llava")   # import: HF / GGUF -> vlmkit
    convert("runs/vlm/model", "exports/llava")       # export: vlmkit -> HF
"""
from vlmkit.convert.auto import convert, load_decoder

__all__ = ["convert", "load_decoder"]
