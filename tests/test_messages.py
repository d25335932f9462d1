"""One message format: strings with `<image>` and typed parts render alike through every template."""
from __future__ import annotations

import pytest

from vlmkit.data.lm_tokenizer import LMTokenizer
from vlmkit.data.messages import for_template, normalize, reads_parts

PARTS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:{% for c in m['content'] %}"
                  "{% if c['type'] == 'image' %}[IMG]{% else %}{{ c['text'] }}{% endif %}{% endfor %}|{% endfor %}")


def test_strings_and_parts_are_the_same_messages():
    as_string = [{"role": "user", "content": "<image>\nWhat is this?\n<image>"}]
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:x"}}]}]
    (strings, no_images), (parts, carried) = normalize(as_string), normalize(as_parts)
    assert no_images == [None, None] and carried == [None, "data:x"]
    assert for_template(parts, parts=False) == strings
    assert for_template(strings, parts=True) == for_template(parts, parts=True)


def test_templates_read_the_form_they_expect():
    assert reads_parts(PARTS_TEMPLATE) and reads_parts("{{ content.type }}")
    assert not reads_parts("{{ message['content'] }}")
    tokenizer = LMTokenizer.train(["a b c"] * 3, vocab_size=280, min_frequency=1)
    typed = tokenizer.with_template(PARTS_TEMPLATE)
    for messages in ([{"role": "user", "content": "<image>\nhi"}],
                     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]):
        assert typed.apply_chat_template(messages) == "user:[IMG]hi|"
        assert tokenizer.apply_chat_template(messages) == "<|im_start|>user\n<image>\nhi<|im_end|>\n"


@pytest.mark.parametrize("messages,error", [
    ("hi", "list of"),
    ([{"role": "robot", "content": "hi"}], "role must be"),
    ([{"role": "user", "content": 3}], "string or a list of typed parts"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "type must be text, image or image_url"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs a string 'text'"),
    ([{"role": "user", "content": [{"type": "text", "text": "<image> hi"}]}], "image placeholder"),
])
def test_malformed_messages_are_named(messages, error):
    with pytest.raises(ValueError, match=error):
        normalize(messages)
