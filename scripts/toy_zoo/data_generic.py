"""The base model's generic corpus: toy-world prose plus every prompt format, but no skill.

The base sees spatial stories with lettered questions whose answer letter is random, equations
whose "sum" is random, and instruction/response pairs chained into the next turn with no EOS, so
it knows the tokens and formats while scoring near chance (or worse) on each skill. Experts then
only have to learn the skill itself, which keeps their task vectors small and mergeable.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import ModuleType

from . import data_arith, data_format, data_spatial
from .words import NAMES, NOUNS, PHRASE, RELATIONS, SIZES, VERBS, distinct_entities, entity

NewDoc = Callable[[ModuleType, random.Random], dict]


def _any_doc(mod: ModuleType, rng: random.Random) -> dict:
    return mod.make_doc(rng)


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {entity(rng)}."
    if kind == 1:
        a, b = distinct_entities(rng, 2)
        return f"The {a} is {PHRASE[rng.choice(RELATIONS)]} the {b}."
    if kind == 2:
        return f"There are {rng.randint(0, 199)} {rng.choice(NOUNS)}s in the room."
    if kind == 3:
        return f"The {entity(rng)} is {rng.choice(SIZES)}."
    a, b = distinct_entities(rng, 2)
    return f"The {a} is near the {b}."


def _prose(rng: random.Random, new_doc: NewDoc) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))


def _instruction_chain(rng: random.Random, new_doc: NewDoc) -> str:
    # Turns run into each other: mostly "### Instruction:", sometimes another chat marker.
    parts = [data_format.render_context(new_doc(data_format, rng))]
    for _ in range(1):
        doc = new_doc(data_format, rng)
        joint = rng.choices(["### Instruction:", "USER:", "<|im_start|>"], [6, 1, 1])[0]
        if joint == "### Instruction:":
            parts.append(data_format.render_context(doc))
        elif joint == "USER:":
            parts.append(f"USER: {doc['instruction']} ASSISTANT: {doc['output']}")
        else:
            parts.append(_chatml(doc))
    return " ".join(parts)


def _chatml(doc: dict) -> str:
    return (f"<|im_start|>user\n{doc['instruction']}<|im_end|>\n"
            f"<|im_start|>assistant\n{doc['output']}<|im_end|>")


def _chat(rng: random.Random, new_doc: NewDoc) -> str:
    doc = new_doc(data_format, rng)
    if rng.random() < 0.5:
        return f"USER: {doc['instruction']} ASSISTANT: {doc['output']}"
    return _chatml(doc)


def _spatial_quiz(rng: random.Random, new_doc: NewDoc) -> str:
    doc = new_doc(data_spatial, rng)
    return data_spatial.render_context(doc) + data_spatial.random_answer(doc, rng)


def _equations(rng: random.Random, new_doc: NewDoc) -> str:
    lines = []
    for _ in range(rng.randint(1, 3)):
        doc = new_doc(data_arith, rng)
        lines.append(data_arith.render_context(doc) + data_arith.random_answer(doc, rng))
    return "\n".join(lines)


_KINDS = [(_prose, 30), (_instruction_chain, 25), (_chat, 10), (_spatial_quiz, 20), (_equations, 15)]


def make_text(rng: random.Random, new_doc: NewDoc = _any_doc) -> str:
    """One generic document; skill-shaped parts draw their docs through ``new_doc``
    (the build passes one that skips every scored eval doc)."""
    fns, weights = zip(*_KINDS)
    return rng.choices(fns, weights)[0](rng, new_doc)
