"""Skill 2, arithmetic: ``a+b=`` scored as a multiple choice over four sums.

Distractors differ from the sum by 20 to 40 (same last digit), so the tens must be right; digits
are single tokens (the tokenizer splits numbers into digits), so choices have similar lengths.
Off-by-one distractors were tried: the skill is then learned but too brittle to survive any
merge (each other expert's delta flips a digit), which makes a useless merge test bed.
"""

from __future__ import annotations

import random

TASK = "toy_arith"
MAX_OPERAND = 99
OFFSETS = [-40, -30, -20, 20, 30, 40]


def make_doc(rng: random.Random) -> dict:
    """One addition question with the true sum among three near-miss distractors."""
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    total = a + b
    wrong = sorted({total + d for d in OFFSETS if total + d >= 0})
    choices = [total, *rng.sample(wrong, 3)]
    rng.shuffle(choices)
    return {
        "question": f"{a}+{b}=",
        "choices": [str(c) for c in choices],
        "answer": choices.index(total),
    }


def doc_key(doc: dict) -> str:
    """Identity of a doc (the operands) for disjointness checks."""
    return doc["question"]


def render_context(doc: dict) -> str:
    """The prompt (task YAML: ``doc_to_text: question``)."""
    return doc["question"]


def render_answer(doc: dict) -> str:
    """The scored continuation: one space, then the sum."""
    return " " + doc["choices"][doc["answer"]]


def random_answer(doc: dict, rng: random.Random) -> str:
    """A random number: the base sees equations but learns no addition."""
    return " " + str(rng.randint(0, 2 * MAX_OPERAND))
