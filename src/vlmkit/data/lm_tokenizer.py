"""Tokenizer for decoder LMs: byte-level BPE over Hugging Face `tokenizers`, plus a chat template.

Unlike the text-encoder `Tokenizer`, it adds no [CLS]/[SEP]: the chat template decides
every special token. It trains a small vocabulary for from-scratch LMs, wraps a pretrained
one (SmolLM2's, built from its GGUF file), and saves as `tokenizer.json` +
`tokenizer_config.json` (with `chat_template`), which `transformers` reads too.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from vlmkit.config import IMAGE_TOKEN
from vlmkit.data.messages import for_template, normalize, reads_parts

# ChatML, the template SmolLM2, Qwen2 and many others ship.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SPECIALS = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>"}


class LMTokenizer:
    def __init__(self, backend: HFTokenizer, special_tokens: dict[str, str], chat_template: str,
                 model_max_length: int = 2048, stop_tokens: Sequence[str] = ()):
        self._backend = backend
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        # Tokens besides eos_token that end an answer (a checkpoint's generation_config may list
        # several: SmolVLM stops at <end_of_utterance> and at <|im_end|>).
        self.stop_tokens = [t for t in dict.fromkeys(stop_tokens) if t != special_tokens.get("eos_token")]
        backend.no_padding()
        backend.no_truncation()
        # The image placeholder must stay one token whatever the vocabulary; a pretrained
        # tokenizer gets it appended (its id may lie past the LM's embedding table, which is
        # fine: image slots are overwritten before the LM sees them).
        backend.add_special_tokens([IMAGE_TOKEN] + [t for t in special_tokens.values()])
        missing = [t for t in [*special_tokens.values(), *self.stop_tokens] if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag])
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(chat_template)
        except jinja2.TemplateError as e:
            raise ValueError(f"malformed chat template: {e}") from e
        self.reads_parts = reads_parts(chat_template)

    def with_tokens(self, tokens: Sequence[str]) -> "LMTokenizer":
        """A copy with `tokens` added as special tokens (new ids after the vocabulary; kept ones stay)."""
        backend = HFTokenizer.from_str(self._backend.to_str())
        backend.add_special_tokens(list(tokens))
        return LMTokenizer(backend, self.special_tokens, self.chat_template, self.model_max_length, self.stop_tokens)

    def with_template(self, chat_template: str) -> "LMTokenizer":
        """The same vocabulary with another chat template (a VLM processor's, say)."""
        return LMTokenizer(self._backend, self.special_tokens, chat_template, self.model_max_length, self.stop_tokens)

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2,
              extra_tokens: Sequence[str] = ()) -> "LMTokenizer":
        """Byte-level BPE on `texts`, with ChatML special tokens first (pad=0), then `extra_tokens`.

        Train on conversations rendered with the template (`render_chatml`), so the words
        the template adds ("user", "assistant") become single tokens too.
        """
        corpus = [t for t in texts if t and t.strip()]
        if not corpus:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        specials = [DEFAULT_SPECIALS["pad_token"], DEFAULT_SPECIALS["bos_token"], DEFAULT_SPECIALS["eos_token"],
                    IMAGE_TOKEN, *extra_tokens]
        backend = HFTokenizer(models.BPE())
        backend.add_special_tokens(specials)   # kept whole in the corpus, never merged into words
        # One token per digit (as Llama and SmolLM2 do): numbers, box coordinates included,
        # are then always spelled the same way, whatever precedes them.
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(corpus, trainer=trainer)
        return cls(backend, DEFAULT_SPECIALS, CHATML_TEMPLATE)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LMTokenizer":
        """Load a directory with `tokenizer.json` and `tokenizer_config.json`.

        Hugging Face directories spread the same facts over more files: older ones keep the
        special tokens in `special_tokens_map.json`, and transformers 5 saves the chat
        template as `chat_template.jinja`; both are read when tokenizer_config.json lacks them.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise ValueError(f"malformed tokenizer file {file}: {e}") from e
        map_file = file.parent / "special_tokens_map.json"
        special_map = json.loads(map_file.read_text()) if map_file.is_file() else {}
        specials = {}
        for name in ("eos_token", "bos_token", "pad_token"):
            value = config.get(name) or special_map.get(name)
            if value:
                specials[name] = value["content"] if isinstance(value, dict) else value
        if "eos_token" not in specials:
            raise ValueError(f"{config_file}: no eos_token; the generator needs to know where answers end")
        specials.setdefault("pad_token", specials["eos_token"])
        template = config.get("chat_template")
        if isinstance(template, list):  # older files: named templates; the unnamed use is "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        template_file = file.parent / "chat_template.jinja"
        if not template and template_file.is_file():
            template = template_file.read_text()
        stops = list(config.get("stop_tokens") or [])
        generation_file = file.parent / "generation_config.json"
        if generation_file.is_file():  # transformers stops at every eos_token_id listed there
            eos = json.loads(generation_file.read_text()).get("eos_token_id")
            for i in [eos] if isinstance(eos, int) else eos or []:
                token = backend.id_to_token(i)
                if token is None:
                    raise ValueError(f"{generation_file}: eos_token_id {i} is not in the vocabulary")
                stops.append(token)
        return cls(backend, specials, template or CHATML_TEMPLATE, int(config.get("model_max_length", 2048)), stops)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                  "chat_template": self.chat_template, "model_max_length": self.model_max_length,
                  "image_token": IMAGE_TOKEN}
        if self.stop_tokens:
            config["stop_tokens"] = self.stop_tokens
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    # ------------------------------------------------------------------ use
    def apply_chat_template(self, messages: Sequence[Any], add_generation_prompt: bool = False) -> str:
        """Render messages (see `data.messages`: string or typed-part content; dicts or objects
        with .role/.content) as text, in the content form this template reads."""
        messages = for_template(normalize(messages)[0], self.reads_parts)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from e

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens written in the text kept whole, nothing added."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> Callable[[int], str]:
        """Incremental decoding for one answer: feed ids one at a time, get each one's new text.

        The pieces join to what `decode` gives for all the ids, but each step costs one token,
        not the whole answer. An id that ends partway through a UTF-8 character gives "" until
        the character is complete.
        """
        stream = decoders.DecodeStream(skip_special_tokens=True)
        return lambda token: stream.step(self._backend, token) or ""

    def token_id(self, token: str) -> int:
        i = self._backend.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.special_tokens["eos_token"])

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every token that ends an answer: eos_token first, then `stop_tokens`."""
        return (self.eos_id, *(self.token_id(t) for t in self.stop_tokens))

    @property
    def pad_id(self) -> int:
        return self.token_id(self.special_tokens["pad_token"])

    @property
    def image_id(self) -> int:
        return self.token_id(IMAGE_TOKEN)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> HFTokenizer:
        return self._backend


@functools.cache
def _chatml() -> jinja2.Template:
    # Compiled once: compiling a template costs milliseconds, and a tokenizer is trained on
    # every conversation of a run (minutes for the shapes preset's 120k, compiled per call).
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHATML_TEMPLATE)


def render_chatml(messages: Sequence[Any]) -> str:
    """A conversation in the default template, for training a tokenizer before one exists."""
    as_dicts = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
    return _chatml().render(messages=as_dicts, add_generation_prompt=False)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`, which marks assistant text for
    its masks; vlmkit finds answers by rendering turn by turn, so the body renders as is."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)
