"""Speed of vlmkit against transformers on this machine, side by side, in one command.

    python -m benchmarks.speed [--repeats 5] [--only generation,context,...]   # from the repository root

Workloads (`--only` picks some): `generation` (llava-smol shape: prefill, decode and
end-to-end tokens/s at batch 1 and 8), `context` (decode cost against cached length, a
PNG), `encode` (CLIP ViT-B/32 and SigLIP-B/16 towers, batch 32), `stage1` (a CLIP
ViT-B/32 training step; its peak memory: benchmarks/speed_memory.py), `stage2` (a llava-smol training step), `roofline` (the
machine's matmul and memory speed, and what decoding reaches of them), `startup`
(`vlmkit --help`, loading a checkpoint).

Each side runs identical shapes, identical inputs and, where both load them, identical
weights: transformers builds a random model, `vlmkit convert` imports it, and the outputs
are compared before anything is timed. Each side is timed in every precision it offers on
this machine (fp32, bf16 weights, bf16 autocast for training, vlmkit's int8 weights), with
warm-up, then interleaved repetitions (A B A B ...) because these machines are shared and
noisy; medians are reported with their range, and each headline ratio is vlmkit's fastest
against the peer's fastest. Results: the `speed` section of docs/RESULTS.md,
docs/speed.json and docs/speed_*.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import transformers

from benchmarks.results import ROOT, write_section
from vlmkit.runtime import cpu_flags, native_bf16

DOCS = ROOT / "docs"
NEW_TOKENS = 64
PROMPT_TEXT = 32


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns so that drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """"median (min-max)" of `scale / value` for each value (a rate from seconds)."""
    rates = sorted(scale / v for v in values)
    return f"{statistics.median(rates):.{digits}f} ({rates[0]:.{digits}f}-{rates[-1]:.{digits}f})"


def rate(values: list[float], scale: float = 1.0) -> float:
    return statistics.median(scale / v for v in values)


class Report:
    """Rows for RESULTS.md (section, figure, value) and the same figures as JSON."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []
        self.data: dict[str, object] = {}

    def add(self, section: str, figure: str, value: str, key: str | None = None, number=None) -> None:
        self.rows.append((section, figure, value))
        print(f"{section} | {figure} | {value}", flush=True)
        if key is not None:
            self.data[key] = number if number is not None else value


# ----------------------------------------------------------------------------- the machine
def machine_rows(report: Report) -> None:
    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    report.add("machine", "CPU instruction sets seen", " ".join(f for f in wanted if f in flags) or "unknown",
               "cpu_flags")
    report.add("machine", "native bf16 on this CPU", "yes" if native_bf16("cpu") else "no (emulated: slower than fp32)",
               "native_bf16", native_bf16("cpu"))
    report.add("machine", "torch threads", str(torch.get_num_threads()))


# ----------------------------------------------------------------------------- llava-smol
def build_llava_smol(tmp: Path) -> tuple[Path, Path, object]:
    """A transformers LLaVA of the llava-smol shape -> (its directory, vlmkit's import of it, tokenizer).

    SigLIP-B/16 at 224 px (196 image tokens, random weights) and SmolLM2-135M (its real
    weights, from the GGUF file vlmkit ships a reader for), joined by a random projector.
    """
    from vlmkit.config import IMAGE_TOKEN
    from vlmkit.convert.auto import convert
    from vlmkit.convert.gguf import read_gguf, smollm2_path
    from vlmkit.convert.hf_llama import decoder_config_to_hf, decoder_state_to_hf

    cfg, state, tokenizer = read_gguf(smollm2_path(), max_positions=4096)
    tokenizer = tokenizer.with_tokens([IMAGE_TOKEN])
    cfg = replace(cfg, vocab_size=tokenizer.vocab_size)
    embed = state.pop("embed.weight")
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(cfg.vocab_size - len(embed), -1)])
    state = {**state, "embed.weight": grown}
    state.pop("lm_head.weight", None)
    text = transformers.LlamaConfig(**decoder_config_to_hf(cfg))
    vision = transformers.SiglipVisionConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                             num_attention_heads=12, intermediate_size=3072, vision_use_head=False)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.image_id, vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_seq_length=196))
    lm = decoder_state_to_hf(state, cfg, prefix="model.language_model.")
    missing, unexpected = hf.load_state_dict(lm, strict=False)
    assert not unexpected and all(k.startswith(("model.vision_tower", "model.multi_modal_projector", "lm_head"))
                                  for k in missing), (missing, unexpected)
    hf.tie_weights()
    hf_dir, ours_dir = tmp / "hf-llava-smol", tmp / "vlmkit-llava-smol"
    hf.save_pretrained(hf_dir)
    tokenizer.save(hf_dir)
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    convert(hf_dir, ours_dir)
    return hf_dir, ours_dir, tokenizer


def llava_inputs(tokenizer, batch: int) -> tuple[list[list[int]], torch.Tensor]:
    """`batch` prompts, each one image + 32..32+3*(batch-1) text tokens (so a batch is left padded)."""
    from vlmkit.data.chat import encode_conversation

    torch.manual_seed(1)
    prompts = []
    words = "describe the shapes colours and sizes you see in this picture then say which one is largest".split()
    for row in range(batch):
        n = PROMPT_TEXT + 3 * row
        text = " ".join(words[i % len(words)] for i in range(n))
        ids = encode_conversation([{"role": "user", "content": "<image>\n" + text}], tokenizer, 196, 4096,
                                  add_generation_prompt=True).ids
        prompts.append(ids)
    return prompts, torch.randn(batch, 3, 224, 224)


class Ours:
    def __init__(self, path: Path, precision: str):
        import vlmkit

        self.assistant = vlmkit.load(path, device="cpu", precision=precision)
        self.engine = self.assistant.engine

    def generate(self, prompts, pixels, new_tokens: int, clock: list | None = None) -> list[list[int]]:
        """Greedy ids; `clock` receives the time each decode step's tokens came out."""
        from vlmkit.inference.engine import SamplingParams

        out: list[list[int]] = [[] for _ in prompts]
        for emitted in self.engine.stream(prompts, [p[None] for p in pixels], SamplingParams(max_new_tokens=new_tokens)):
            if clock is not None:
                clock.append(time.perf_counter())
            for row, token in emitted:
                out[row].append(token)
        return out


class _Clock(transformers.generation.streamers.BaseStreamer):
    """Notes when each step's tokens come out of `generate` (the first call is the prompt itself)."""

    def __init__(self, clock: list):
        self.clock, self.prompt_seen = clock, False

    def put(self, value):
        if self.prompt_seen:
            self.clock.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


class Theirs:
    def __init__(self, path: Path, dtype: torch.dtype, static_cache: bool, pad_id: int):
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        self.model.generation_config.eos_token_id = None   # both sides generate every token asked for
        self.dtype, self.static, self.pad_id = dtype, static_cache, pad_id

    @torch.inference_mode()
    def generate(self, prompts, pixels, new_tokens: int, clock: list | None = None) -> list[list[int]]:
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, longest - len(p):], mask[row, longest - len(p):] = torch.tensor(p), 1
        extra = {"cache_implementation": "static"} if self.static else {}
        if clock is not None:
            extra["streamer"] = _Clock(clock)
        out = self.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(self.dtype),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id, **extra)
        return out[:, longest:].tolist()


def timed_generation(model, prompts, pixels) -> tuple[float, float]:
    """(seconds to the first new token, seconds for all 64): one run gives both."""
    clock: list[float] = []
    started = time.perf_counter()
    model.generate(prompts, pixels, NEW_TOKENS, clock)
    return clock[0] - started, clock[-1] - started


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """How many leading tokens two greedy generations share, over all rows."""
    same = total = 0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        same, total = same + n, total + len(x)
    return "identical" if same == total else f"first {same}/{total} tokens identical"


def generation(report: Report, tmp: Path, repeats: int) -> dict:
    hf_dir, ours_dir, tokenizer = build_llava_smol(tmp)
    sides: dict[str, Callable[[], object]] = {
        "vlmkit fp32": lambda: Ours(ours_dir, "fp32"),
        "vlmkit bf16": lambda: Ours(ours_dir, "bf16"),
        "vlmkit int8": lambda: Ours(ours_dir, "int8"),
        "transformers fp32": lambda: Theirs(hf_dir, torch.float32, False, tokenizer.pad_id),
        "transformers fp32 static cache": lambda: Theirs(hf_dir, torch.float32, True, tokenizer.pad_id),
        "transformers bf16": lambda: Theirs(hf_dir, torch.bfloat16, False, tokenizer.pad_id),
        "transformers bf16 static cache": lambda: Theirs(hf_dir, torch.bfloat16, True, tokenizer.pad_id),
    }
    models = {name: make() for name, make in sides.items()}
    section = "generation, llava-smol shape (1 image = 196 tokens + 32-53 text tokens, 64 new, greedy)"
    out: dict = {"models": models, "tokenizer": tokenizer, "hf_dir": hf_dir, "ours_dir": ours_dir, "timing": {}}
    for batch in (1, 8):
        prompts, pixels = llava_inputs(tokenizer, batch)
        names = list(models)
        if batch == 8:   # transformers' dynamic cache at batch 8 is slower than its static one in both dtypes
            names = [n for n in names if not (n.startswith("transformers") and "static" not in n)]
        reference = {name: models[name].generate(prompts, pixels, NEW_TOKENS) for name in names}   # also warm-up
        base_name = "transformers fp32" if batch == 1 else "transformers fp32 static cache"
        base = reference[base_name]
        for name in names:
            report.add(section, f"b{batch} greedy ids, {name} vs {base_name}", agreement(reference[name], base))
        if reference["vlmkit fp32"] != base:
            raise SystemExit(f"batch {batch}: vlmkit fp32 and transformers fp32 disagree; fix parity before timing")
        runs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for _ in range(repeats):   # interleaved
            for name in names:
                runs[name].append(timed_generation(models[name], prompts, pixels))
        for name in names:
            first = [r[0] for r in runs[name]]
            decode = [batch * (NEW_TOKENS - 1) / (r[1] - r[0]) for r in runs[name]]
            pre, dec = statistics.median(first), statistics.median(decode)
            timing = {"prefill_s": pre, "decode_tok_s": dec,
                      "e2e_tok_s": statistics.median(batch * NEW_TOKENS / r[1] for r in runs[name])}
            out["timing"][(batch, name)] = timing
            report.add(section, f"b{batch} prefill (time to first token) ms, {name}",
                       f"{pre * 1000:.0f} ({min(first) * 1000:.0f}-{max(first) * 1000:.0f})",
                       f"b{batch}/{name}/prefill_ms", pre * 1000)
            report.add(section, f"b{batch} decode tokens/s, {name}", f"{dec:.1f} ({min(decode):.1f}-{max(decode):.1f})",
                       f"b{batch}/{name}/decode_tok_s", dec)
            report.add(section, f"b{batch} end-to-end tokens/s, {name}", f"{timing['e2e_tok_s']:.1f}",
                       f"b{batch}/{name}/e2e_tok_s", timing["e2e_tok_s"])
    return out


def headline(report: Report, gen: dict) -> None:
    def best(batch: int, side: str, key: str, lower: bool = False) -> tuple[str, float]:
        cands = [(name, v[key]) for (b, name), v in gen["timing"].items() if b == batch and name.startswith(side)]
        return (min if lower else max)(cands, key=lambda c: c[1])

    for batch in (1, 8):
        (a, va), (b, vb) = best(batch, "vlmkit", "decode_tok_s"), best(batch, "transformers", "decode_tok_s")
        report.add("speed", f"decode b{batch} speed-up vs transformers", f"{va / vb:.2f}x ({a} {va:.1f} / {b} "
                   f"{vb:.1f} tokens/s)", f"decode_b{batch}_speedup", va / vb)
    (a, va), (b, vb) = best(1, "vlmkit", "prefill_s", True), best(1, "transformers", "prefill_s", True)
    report.add("speed", "prefill b1 speed-up vs transformers", f"{vb / va:.2f}x ({a} {va * 1000:.0f} ms / {b} "
               f"{vb * 1000:.0f} ms)", "prefill_b1_speedup", vb / va)


# ----------------------------------------------------------------------------- context length
def context(report: Report, gen: dict, repeats: int) -> None:
    from vlmkit.inference.engine import Engine, SamplingParams

    models, tokenizer = gen["models"], gen["tokenizer"]
    # transformers' bf16 would spend minutes per 2048-token prompt in emulated bf16 arithmetic
    names = [n for n in models if n in ("vlmkit int8", "vlmkit bf16", "vlmkit fp32", "transformers fp32 static cache")
             or (n == "transformers bf16 static cache" and native_bf16("cpu"))]
    lengths = (128, 512, 1024, 2048)
    steps = 16
    costs: dict[str, list[float]] = {n: [] for n in names}
    section = "decode cost against context (text only, batch 1, 16 new tokens)"
    for length in lengths:
        torch.manual_seed(length)
        ids = torch.randint(100, 40000, (length,)).tolist()

        def per_token(name: str) -> float:
            """ms between the first and the last of `steps` + 1 new tokens, from the tokens' own
            timestamps: the prompt's seconds never enter (a difference of two whole runs did, and
            at 2048 positions their noise outgrew the decode time itself)."""
            m, clock = models[name], []
            if name.startswith("vlmkit"):   # the Engine runs the language model alone: any DecoderLM
                engine = Engine(m.engine.lm, tokenizer.pad_id)
                for _ in engine.stream([ids], [None], SamplingParams(max_new_tokens=steps + 1)):
                    clock.append(time.perf_counter())
            else:
                m.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                                 do_sample=False, pad_token_id=tokenizer.pad_id, streamer=_Clock(clock),
                                 **({"cache_implementation": "static"} if m.static else {}))
            return (clock[-1] - clock[0]) / (len(clock) - 1) * 1000

        measured: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(repeats):   # interleaved: every side in each round
            for n in names:
                measured[n].append(per_token(n))
        for n in names:
            ms = statistics.median(measured[n])
            costs[n].append(ms)
            report.add(section, f"ms per token at {length} cached positions, {n}", f"{ms:.1f}",
                       f"context/{n}/{length}", ms)
    for n in names:
        report.add(section, f"cost at 2048 / cost at 128, {n}", f"{costs[n][-1] / costs[n][0]:.2f}x",
                   f"context/{n}/ratio", costs[n][-1] / costs[n][0])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        ax.plot(lengths, costs[n], marker="o", label=n)
    ax.set_xlabel("cached positions")
    ax.set_ylabel("ms per new token (batch 1)")
    ax.set_title("Decode cost against context length")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.savefig(DOCS / "speed_context.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- image encoding
def _towers(kind: str):
    """(vlmkit VisionTransformer, transformers vision model) with the same random weights."""
    from vlmkit.convert.hf_clip_vision import map_vision_state, vision_config_from_hf
    from vlmkit.models.vit import VisionTransformer

    torch.manual_seed(0)
    if kind == "clip":
        hf_cfg = transformers.CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                                               num_attention_heads=12, intermediate_size=3072,
                                               hidden_act="quick_gelu")
        theirs = transformers.CLIPVisionModel(hf_cfg).eval()
    else:
        hf_cfg = transformers.SiglipVisionConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                                 num_attention_heads=12, intermediate_size=3072, vision_use_head=False)
        theirs = transformers.SiglipVisionModel(hf_cfg).eval()
    cfg = vision_config_from_hf(hf_cfg.to_dict(), kind)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict(map_vision_state(dict(theirs.state_dict()), cfg, "", kind))
    return ours, theirs


def encode(report: Report, repeats: int) -> dict:
    results = {}
    pixels = torch.randn(32, 3, 224, 224)
    for kind, title in (("clip", "CLIP ViT-B/32"), ("siglip", "SigLIP-B/16")):
        ours, theirs = _towers(kind)
        section = f"image encoding, {title} at 224 px, batch 32"
        with torch.inference_mode():   # CLIP's last_hidden_state comes before its final norm, SigLIP's after
            torch.testing.assert_close(ours(pixels[:2], layer=-1 if kind == "clip" else None),
                                       theirs(pixel_values=pixels[:2]).last_hidden_state, atol=1e-4, rtol=1e-4)
        fns = {"vlmkit fp32": lambda: ours(pixels), "transformers fp32": lambda: theirs(pixel_values=pixels)}
        if native_bf16("cpu"):   # emulated bf16 arithmetic is several times slower than fp32: not a contender
            ours16, theirs16 = (m.to(torch.bfloat16) for m in _towers(kind))
            fns.update({"vlmkit bf16": lambda: ours16(pixels),
                        "transformers bf16": lambda: theirs16(pixel_values=pixels.bfloat16())})
        with torch.inference_mode():
            times = interleaved(fns, repeats)
        for name, t in times.items():
            report.add(section, f"images/s, {name}", spread(t, 32), f"encode/{kind}/{name}", rate(t, 32))
        results[kind] = {name: rate(t, 32) for name, t in times.items()}
        fp32 = results[kind]["vlmkit fp32"] / results[kind]["transformers fp32"]
        report.add(section, "fp32 ratio vlmkit / transformers", f"{fp32:.2f}x", f"encode/{kind}/fp32_ratio", fp32)
    return results


# ----------------------------------------------------------------------------- Stage 1 step
CLIP_B32 = dict(vision=dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12,
                            num_attention_heads=12, intermediate_size=3072),
                text=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                          max_position_embeddings=77, vocab_size=49408))


def _clip_model(side: str):
    """The CLIP ViT-B/32-shaped model of one side; vlmkit's converted from transformers' random one."""
    from vlmkit.convert.hf_clip import dual_encoder_config_from_hf, map_dual_encoder_state
    from vlmkit.models.dual_encoder import DualEncoder

    torch.manual_seed(0)
    hf_cfg = transformers.CLIPConfig(vision_config=CLIP_B32["vision"], text_config=CLIP_B32["text"], projection_dim=512)
    theirs = transformers.CLIPModel(hf_cfg)
    if side == "transformers":
        return theirs
    cfg = dual_encoder_config_from_hf(hf_cfg.to_dict())
    ours = DualEncoder(cfg)
    ours.load_state_dict(map_dual_encoder_state(dict(theirs.state_dict()), cfg, "clip"))
    return ours


def _clip_batch(batch: int = 32):
    torch.manual_seed(2)
    ids = torch.randint(1, 49407, (batch, 77))
    lengths = torch.randint(8, 77, (batch,))
    mask = (torch.arange(77)[None] < lengths[:, None]).long()
    ids[torch.arange(batch), lengths - 1] = 49407    # CLIP pools at its end-of-text token, the largest id
    ids = ids * mask
    return torch.randn(batch, 3, 224, 224), ids, mask


def stage1_step(side: str, precision: str):
    """One training step function, as each library's users run it."""
    from vlmkit.losses import infonce_loss

    model = _clip_model(side)
    pixels, ids, mask = _clip_batch()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else None
    if side == "vlmkit":   # the Trainer's optimizer and the contrastive recipe's loss
        model, opt = model.train(), torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-6, fused=True)

        def loss():
            image, text, scale, _ = model(pixels, ids, mask)
            return infonce_loss(image, text, scale.float())
    else:
        model, opt = model.train(), torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-6)

        def loss():
            return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss

    def step():
        if cast is not None:
            with cast:
                value = loss()
        else:
            value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def stage1(report: Report, repeats: int) -> dict:
    section = "Stage 1 training step, CLIP ViT-B/32 shape, batch 32 (forward + InfoNCE + backward + AdamW)"
    precisions = ["fp32", "bf16"] if native_bf16("cpu") else ["fp32"]   # emulated bf16 is no contender
    fns = {f"{side} {p}": stage1_step(side, p) for p in precisions for side in ("vlmkit", "transformers")}
    times = interleaved(fns, repeats)
    results = {}
    for name, t in times.items():
        results[name] = rate(t, 32)
        report.add(section, f"samples/s, {name}", spread(t, 32), f"stage1/{name}", results[name])
    for p in precisions:
        ratio = results[f"vlmkit {p}"] / results[f"transformers {p}"]
        report.add(section, f"{p} ratio vlmkit / transformers", f"{ratio:.2f}x", f"stage1/{p}_ratio", ratio)
    return results


# ----------------------------------------------------------------------------- Stage 2 step
def stage2(report: Report, gen: dict, repeats: int) -> None:
    from vlmkit.checkpoint import load_model
    from vlmkit.losses import answer_loss, answer_positions
    from vlmkit.models.lora import inject_lora

    section = "Stage 2 training step, llava-smol shape, batch 4 (228 prompt + 8 answer tokens; tower frozen)"
    tokenizer = gen["tokenizer"]
    prompts, pixels = llava_inputs(tokenizer, 1)
    batch = 4
    ids = torch.tensor([prompts[0] + [tokenizer.eos_id] * 8] * batch)
    labels = ids.clone()
    labels[:, :len(prompts[0])] = -100
    pixels = pixels.expand(batch, -1, -1, -1).contiguous()

    def ours(lora: bool):
        model = load_model(gen["ours_dir"]).train()
        model.vision_tower.requires_grad_(False)
        if lora:
            model.requires_grad_(False)
            inject_lora(model.language_model, rank=16, alpha=32)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        where = answer_positions(labels)

        def step():   # the instruct recipe's loss: logits at the answer positions only
            answer_loss(model(ids, pixels=pixels, logits_at=where), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def theirs():
        model = transformers.LlavaForConditionalGeneration.from_pretrained(gen["hf_dir"]).train()
        model.model.vision_tower.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    times = interleaved({"vlmkit full": ours(False), "vlmkit LoRA r16": ours(True), "transformers full": theirs()},
                        repeats)
    for name, t in times.items():
        report.add(section, f"samples/s, {name}", spread(t, batch, 2), f"stage2/{name}", rate(t, batch))
    ratio = rate(times["vlmkit full"]) / rate(times["transformers full"])
    report.add(section, "full fine-tuning ratio vlmkit / transformers (fp32)", f"{ratio:.2f}x", "stage2/ratio", ratio)


# ----------------------------------------------------------------------------- roofline
def roofline(report: Report, gen: dict | None) -> None:
    section = "roofline: what this machine can do, and what decoding reaches of it"
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    pairs = {"fp32": (a, b)}
    if native_bf16("cpu"):   # emulated bf16 takes minutes at this size, and nothing here runs in it
        pairs["bf16"] = (a.bfloat16(), b.bfloat16())
    for name, (x, y) in pairs.items():
        t = statistics.median(interleaved({name: lambda: x @ y}, 5)[name])
        report.add(section, f"matmul GFLOP/s, {name} ({n}x{n})", f"{2 * n ** 3 / t / 1e9:.0f}",
                   f"roofline/matmul_{name}", 2 * n ** 3 / t / 1e9)
    big = torch.ones(256 * 1024 * 1024)   # 1 GiB of fp32
    t = statistics.median(interleaved({"read": big.sum}, 5)["read"])
    bandwidth = big.numel() * big.element_size() / t / 1e9
    big = None   # give the memory back before anything else runs
    report.add(section, "memory read GB/s (sum over 1 GiB)", f"{bandwidth:.1f}", "roofline/read_gbs", bandwidth)
    if gen is None:
        return
    for name in ("vlmkit fp32", "vlmkit bf16", "vlmkit int8"):
        lm = gen["models"][name].engine.lm
        weight_bytes = sum(t.numel() * t.element_size() for k, t in lm.state_dict().items()
                           if not k.startswith("embed."))   # the embedding is looked up, not read whole
        kv = 2 * lm.cfg.depth * lm.cfg.kv_heads * lm.cfg.head_dim * 260 * (4 if name.endswith("fp32") else 2)
        tok_s = gen["timing"][(1, name)]["decode_tok_s"]
        gbs = (weight_bytes + kv) * tok_s / 1e9
        report.add(section, f"decode b1 effective GB/s, {name} ({weight_bytes / 1e6:.0f} MB of weights per token)",
                   f"{gbs:.1f} ({gbs / bandwidth:.0%} of the measured read speed)", f"roofline/decode_gbs/{name}", gbs)


# ----------------------------------------------------------------------------- start-up
def startup(report: Report, gen: dict | None, repeats: int) -> None:
    section = "start-up"
    vlmkit_bin = Path(sys.executable).parent / "vlmkit"
    times = interleaved({"help": lambda: subprocess.run([str(vlmkit_bin), "--help"], capture_output=True, check=True),
                         "import": lambda: subprocess.run([sys.executable, "-c", "import vlmkit"], check=True)},
                        repeats)
    report.add(section, "`vlmkit --help` wall time, s", f"{statistics.median(times['help']):.2f}",
               "startup/help_s", statistics.median(times["help"]))
    report.add(section, "`python -c 'import vlmkit'` wall time, s", f"{statistics.median(times['import']):.2f}",
               "startup/import_s", statistics.median(times["import"]))
    if gen is None:
        return
    import vlmkit
    from vlmkit.checkpoint import load_model

    loads = interleaved({
        "vlmkit load_model": lambda: load_model(gen["ours_dir"]),
        "vlmkit.load (model + tokenizer + preprocessing)": lambda: vlmkit.load(gen["ours_dir"], device="cpu",
                                                                               precision="fp32"),
        "transformers from_pretrained": lambda: transformers.LlavaForConditionalGeneration.from_pretrained(
            gen["hf_dir"]),
    }, repeats)
    for name, t in loads.items():
        report.add(section, f"load llava-smol from disk (after imports), {name}, s", f"{statistics.median(t):.2f}",
                   f"startup/load/{name}", statistics.median(t))
    ratio = statistics.median(loads["transformers from_pretrained"]) / statistics.median(loads["vlmkit load_model"])
    report.add(section, "load speed-up vs transformers", f"{ratio:.2f}x", "startup/load_ratio", ratio)


# ----------------------------------------------------------------------------- main
WORKLOADS = ("generation", "context", "encode", "stage1", "stage2", "roofline", "startup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the rows; write nothing")
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    os.environ.pop("VLMKIT_PRECISION", None)
    report = Report()
    machine_rows(report)
    started = time.time()
    try:
        run(report, chosen, args.repeats)
    except BaseException as e:   # what finished is still written, and says where it stopped
        report.add("machine", "benchmark stopped early", f"{type(e).__name__}: {e}".replace("|", "/")[:200])
        raise
    finally:
        report.add("machine", "benchmark wall time, min", f"{(time.time() - started) / 60:.1f}")
        if not args.dry_run:
            publish(report)


def run(report: Report, chosen: list[str], repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gen = generation(report, Path(tmp), repeats) if "generation" in chosen else None
        if gen is not None:
            headline(report, gen)
        if "context" in chosen and gen is not None:
            context(report, gen, max(2, repeats // 2))
        if "encode" in chosen:
            enc = encode(report, repeats)
            best = {k: (max(v for n, v in r.items() if n.startswith("vlmkit")),
                        max(v for n, v in r.items() if n.startswith("transformers"))) for k, r in enc.items()}
            worst = min(a / b for a, b in best.values())
            report.add("speed", "image encode speed-up vs transformers",
                       f"{worst:.2f}x (the lower of CLIP B/32 and SigLIP B/16, each side's fastest precision)",
                       "image_encode_speedup", worst)
        if "stage1" in chosen:
            s1 = stage1(report, max(2, repeats // 2))
            a = max(v for n, v in s1.items() if n.startswith("vlmkit"))
            b = max(v for n, v in s1.items() if n.startswith("transformers"))
            report.add("speed", "stage1 train speed-up vs transformers", f"{a / b:.2f}x (each side's fastest precision)",
                       "stage1_train_speedup", a / b)
        if "stage2" in chosen and gen is not None:
            stage2(report, gen, max(2, repeats // 2))
        if "roofline" in chosen:
            roofline(report, gen)
        if "startup" in chosen:
            startup(report, gen, repeats)


def publish(report: Report) -> None:
    """Headline rows first, then every section's rows; JSON beside."""
    order = ["speed"] + [s for s in dict.fromkeys(r[0] for r in report.rows) if s != "speed"]
    rows = [r for s in order for r in report.rows if r[0] == s]
    write_section("speed", "Speed: vlmkit against transformers, side by side", rows,
                  notes=f"transformers {transformers.__version__}. Ratios above 1 mean vlmkit is faster; each "
                        "headline (section `speed`) compares vlmkit's fastest precision with the peer's fastest. "
                        "Medians of interleaved repeats, range in brackets. Prefill = time to the first new "
                        "token (image encoding included); decode tokens/s = batch x 63 / (time from the first "
                        "to the 64th new token), from the same run. Plot: docs/speed_context.png. "
                        "open_clip is not compared: it needs torchvision, which has no CPU build that "
                        "imports beside this torch.",
                  columns=("section", "figure", "value"))
    (DOCS / "speed.json").write_text(json.dumps(report.data, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
