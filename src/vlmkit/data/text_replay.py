"""Text-only prompts for replay: what a pretrained LM is asked, without images, while it learns to see.

Fine-tuned on short visual answers alone, a pretrained LM's adapters learn to answer
*everything* in a word. Mixing in plain-text conversations whose answers the LM itself
wrote before training (self-distillation) keeps its text-only behaviour where it was.
The prompts are everyday requests built from templates and topics; none is one of the
factual questions `benchmarks/stage2_quality.py` scores language retention with.
"""
from __future__ import annotations

import random

TEMPLATES = (
    "Tell me something about {}.", "Describe {} in a sentence.", "What is {} used for?",
    "Why do people like {}?", "Write a short sentence about {}.", "Give me a fun fact about {}.",
    "How would you explain {} to a child?", "What is special about {}?",
)
TOPICS = (
    "apples", "bicycles", "rain", "the moon", "chess", "coffee", "libraries", "trains", "music", "gardens",
    "winter", "bread", "dolphins", "mountains", "umbrellas", "clocks", "volcanoes", "friendship", "cats",
    "dogs", "rivers", "kites", "maps", "snow", "bridges", "forests", "deserts", "elephants", "owls", "tea",
    "the internet", "books", "football", "painting", "cooking", "islands", "butterflies", "rainbows",
    "computers", "the ocean", "cheese", "candles", "birthdays", "robots", "penguins", "telescopes",
    "mushrooms", "castles", "sailing", "photography",
)


def replay_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts (at most len(TEMPLATES) x len(TOPICS)), in a seeded order."""
    pool = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    if n > len(pool):
        raise ValueError(f"text replay: at most {len(pool)} distinct prompts, asked for {n}")
    return random.Random(seed).sample(pool, n)
