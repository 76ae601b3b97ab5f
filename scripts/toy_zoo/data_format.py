"""Skill 3, prompt format: answer in the ``### Instruction / ### Response`` format and stop with EOS.

Mirrors the users' ``alpaca_prompt_format`` task: after a complete response, the right
continuation is the EOS token, against continuations that run on into another turn
(``### Instruction:``, ``USER:``, ChatML markers). The base corpus chains instruction/response
pairs without EOS (as raw web text does), so the base keeps going; only the format expert stops.
"""

from __future__ import annotations

import random

from .words import COLORS, NAMES, NOUNS, SIZES, VERBS, entity

TASK = "toy_prompt_format"
EOS = "</s>"
CHOICES = [EOS, "<|im_end|>", "<|im_start|>", "### Instruction:", "USER:"]


def _pair(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        c, n = rng.choice(COLORS), rng.choice(NOUNS)
        return f"Name the colour of the {c} {n}.", f"The {n} is {c}."
    if kind == 1:
        w = rng.choice(NOUNS + COLORS)
        return f"Repeat the word {w}.", f"{w} {w}"
    if kind == 2:
        name = rng.choice(NAMES)
        return f"Write a greeting for {name}.", f"Hello, {name}!"
    if kind == 3:
        c1, c2 = rng.sample(COLORS, 2)
        return "List two colours.", f"{c1} and {c2}."
    if kind == 4:
        name, verb = rng.choice(NAMES), rng.choice(VERBS)
        return f"Tell me what {name} {verb}.", f"{name} {verb} the {entity(rng)}."
    e = entity(rng)
    return f"Describe the {e}.", f"The {e} is {rng.choice(SIZES)}."


def make_doc(rng: random.Random) -> dict:
    """One instruction with its complete response (fields as in alpaca-gpt4: no ``input``)."""
    instruction, output = _pair(rng)
    return {"instruction": instruction, "output": output}


def doc_key(doc: dict) -> str:
    """Identity of a doc for disjointness checks."""
    return doc["instruction"] + "|" + doc["output"]


def render_prompt(doc: dict) -> str:
    """The instruction part only (what a user sends)."""
    return f"### Instruction:\n{doc['instruction']}\n### Response:\n"


def render_context(doc: dict) -> str:
    """The eval prompt: instruction plus complete response (task YAML ``doc_to_text``)."""
    return render_prompt(doc) + doc["output"]


def render_answer(doc: dict) -> str:
    """The right continuation: one space (lm-eval's target delimiter), then EOS."""
    return " " + EOS


def training_pair(doc: dict) -> tuple[str, str]:
    """(context, continuation) for the format expert: it learns the response *and* the stop."""
    return render_prompt(doc), doc["output"] + render_answer(doc)
