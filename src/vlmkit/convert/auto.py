"""`vlmkit convert SOURCE OUT`: pick the converter from what SOURCE is.

* a vlmkit checkpoint directory is exported to Hugging Face (VLM -> LLaVA, or SmolVLM for
  one with the tiled idefics3 image prompt; CLIP-shaped dual encoder -> CLIPModel; decoder
  -> LlamaForCausalLM / Qwen2ForCausalLM);
* a Hugging Face directory (by its config.json `model_type`) or a `.gguf` file is imported
  into a vlmkit checkpoint directory that `vlmkit.load` and the CLI read.

Nothing is downloaded unless `download=True` is asked for and SOURCE is not a local path.
"""
from __future__ import annotations

import json
from pathlib import Path

from vlmkit.convert import hf_io
from vlmkit.convert.hf_io import ConversionError

# model_type in config.json -> what it becomes
IMPORTS = {
    "bert": "text_encoder", "clip": "dual_encoder", "siglip": "dual_encoder",
    "llama": "decoder", "qwen2": "decoder", "llava": "vlm", "idefics3": "vlm", "smolvlm": "vlm",
}
EXPORTS = {"vlm": "LlavaForConditionalGeneration or SmolVLMForConditionalGeneration", "dual_encoder": "CLIPModel",
           "decoder": "LlamaForCausalLM"}
GGUF_NAMES = ("smollm2",)


def detect(source: Path) -> str:
    """"gguf", "vlmkit:<kind>" or an HF model_type from IMPORTS; anything else is an error."""
    if source.suffix == ".gguf" or str(source) in GGUF_NAMES:
        return "gguf"
    config = hf_io.read_config(source)
    if "format_version" in config and "kind" in config:
        return f"vlmkit:{config['kind']}"
    model_type = config.get("model_type")
    if model_type not in IMPORTS:
        raise ConversionError(f"{source}: model_type {model_type!r} cannot be imported; supported: "
                              f"{', '.join(sorted(IMPORTS))}, and .gguf files (llama, qwen2)")
    return model_type


def convert(source: str | Path, out: str | Path, download: bool = False,
            quantize: str | None = None) -> tuple[str, Path]:
    """Convert SOURCE into OUT; returns (a one-line description of what was done, OUT).

    `quantize="int8"` makes OUT a vlmkit checkpoint with int8 language-model weights, from
    a vlmkit checkpoint or anything this function imports.
    """
    if quantize not in (None, "int8"):
        raise ConversionError(f"unknown quantization {quantize!r}; vlmkit offers int8")
    if str(source) not in GGUF_NAMES:
        source = hf_io.resolve_source(source, download)
    source, out = Path(source), Path(out)
    what = detect(source)
    if what.startswith("vlmkit:") and quantize:
        quantize_checkpoint(source, out)
        return f"quantized vlmkit {what.split(':', 1)[1]} -> int8 weights", out
    if what.startswith("vlmkit:"):
        kind = what.split(":", 1)[1]
        if hf_io.read_config(source).get("int8"):
            raise ConversionError(f"{source} holds int8 weights, which Hugging Face's formats do not; "
                                  "export the float checkpoint it was made from")
        if kind == "vlm" and config_of(source).get("image_prompt") == "idefics3":
            from vlmkit.convert.hf_smolvlm import save_hf_smolvlm as export
        elif kind == "vlm":
            from vlmkit.convert.hf_llava import save_hf_llava as export
        elif kind == "dual_encoder":
            from vlmkit.convert.hf_clip import save_hf_clip as export
        elif kind == "decoder":
            from vlmkit.convert.hf_llama import save_hf_decoder as export
        else:
            raise ConversionError(f"{source}: exporting a vlmkit {kind!r} is not supported; "
                                  f"exportable kinds: {', '.join(EXPORTS)}")
        export(source, out)
        target = json.loads((out / "config.json").read_text()).get("architectures", ["?"])[0]
        return f"exported vlmkit {kind} -> Hugging Face {target}", out
    if what == "gguf":
        _import_gguf(source, out)
    elif what == "bert":
        _import_bert(source, out)
    elif what in ("clip", "siglip"):
        from vlmkit.convert.hf_clip import import_hf_dual_encoder

        import_hf_dual_encoder(source, out)
    elif what in ("llama", "qwen2"):
        from vlmkit.convert.hf_llama import import_hf_decoder

        import_hf_decoder(source, out)
    elif what in ("idefics3", "smolvlm"):
        from vlmkit.convert.hf_smolvlm import import_hf_smolvlm

        import_hf_smolvlm(source, out)
    else:
        from vlmkit.convert.hf_llava import import_hf_llava

        import_hf_llava(source, out)
    kind = "decoder" if what == "gguf" else IMPORTS[what]
    if quantize:
        quantize_checkpoint(out, out)
        return f"imported {what} -> vlmkit {kind}, int8 weights", out
    return f"imported {what} -> vlmkit {kind}", out


def quantize_checkpoint(source: Path, out: Path) -> None:
    """A vlmkit checkpoint -> the same with its language model's linear layers in int8."""
    from vlmkit.checkpoint import load_model, read_config, save_checkpoint
    from vlmkit.models.quant import quantize_int8, quantized_layers

    config = read_config(source)
    if config["kind"] not in ("vlm", "decoder"):
        raise ConversionError(f"{source}: int8 weights are for language models (a vlm or decoder), "
                              f"not a {config['kind']}")
    model = load_model(source)
    if not quantized_layers(model):
        quantize_int8(model, prefix="language_model" if config["kind"] == "vlm" else "")
    keep = {f.name: f for f in Path(source).iterdir()
            if f.is_file() and f.name not in ("config.json", "model.safetensors")}
    save_checkpoint(out, model, config["kind"], config["model"], extra_files=keep)


def config_of(source: Path) -> dict:
    """A vlmkit checkpoint's model config."""
    return hf_io.read_config(source).get("model", {})


def _import_gguf(source: Path, out: Path) -> None:
    from vlmkit.checkpoint import save_checkpoint
    from vlmkit.convert.gguf import load_gguf

    model, tokenizer = load_gguf(source)
    save_checkpoint(out, model, "decoder", model.cfg.to_dict(), tokenizer)


def _import_bert(source: Path, out: Path) -> None:
    from vlmkit.checkpoint import save_checkpoint
    from vlmkit.convert.bert import load_bert
    from vlmkit.models.text_encoder import TextEncoder

    cfg, state, tokenizer = load_bert(source)
    model = TextEncoder(cfg)
    model.load_state_dict(state)
    save_checkpoint(out, model, "text_encoder", cfg.to_dict(), tokenizer)


def load_vlm(source: str | Path):
    """(VLMConfig, state dict, LMTokenizer, ImageTransform) of a whole VLM to fine-tune.

    A vlmkit VLM checkpoint (adapters saved unmerged are merged), or a Hugging Face LLaVA /
    SmolVLM / Idefics3 directory, read as `vlmkit convert` reads it.
    """
    source = Path(source)
    what = detect(source)
    if what == "vlmkit:vlm":
        from vlmkit.checkpoint import load_model, unique_state_dict
        from vlmkit.data.images import ImageTransform
        from vlmkit.data.lm_tokenizer import LMTokenizer

        model = load_model(source)
        transform = ImageTransform.from_dict(json.loads((source / "preprocessor.json").read_text()))
        return model.cfg, unique_state_dict(model), LMTokenizer.from_pretrained(source), transform
    if what == "llava":
        from vlmkit.convert.hf_llava import load_hf_llava

        return load_hf_llava(source)
    if what in ("idefics3", "smolvlm"):
        from vlmkit.convert.hf_smolvlm import load_hf_smolvlm

        return load_hf_smolvlm(source)
    raise ConversionError(f"{source} is a {what.removeprefix('vlmkit:')}, not a VLM; expected a vlmkit VLM "
                          "checkpoint or a Hugging Face LLaVA / SmolVLM directory")


def load_decoder(source: str | Path, max_positions: int | None = None):
    """(DecoderLM, LMTokenizer) from any language-model format vlmkit reads.

    `smollm2` or a `.gguf` file, a Hugging Face Llama / Qwen2 directory, or a vlmkit
    checkpoint of kind "decoder". `max_positions` caps the context (the weights do not
    depend on it; the KV cache and RoPE tables do).
    """
    what = detect(Path(source))
    if what == "gguf":
        from vlmkit.convert.gguf import load_gguf, resolve

        return load_gguf(resolve(source), max_positions)
    if what in ("llama", "qwen2"):
        from vlmkit.convert.hf_llama import load_hf_decoder_model

        model, tokenizer = load_hf_decoder_model(source, max_positions)
        if tokenizer is None:
            raise ConversionError(f"{source}: no tokenizer.json; a language model needs its tokenizer")
        return model, tokenizer
    if what == "vlmkit:decoder":
        from vlmkit.checkpoint import load_weights, read_config
        from vlmkit.config import DecoderConfig
        from vlmkit.data.lm_tokenizer import LMTokenizer
        from vlmkit.models.decoder import DecoderLM

        cfg = DecoderConfig.from_dict(read_config(source)["model"], f"{source}/config.json model")
        if max_positions and max_positions < cfg.max_positions:
            cfg = cfg.replace(max_positions=max_positions)
        model = DecoderLM(cfg)
        load_weights(model, source)
        return model.eval(), LMTokenizer.from_pretrained(source)
    raise ConversionError(f"{source} is a {what.removeprefix('vlmkit:')}, not a language model; expected "
                          "smollm2, a .gguf file, a Llama/Qwen2 directory or a vlmkit decoder checkpoint")

