"""Build the toy zoo: tokenizer, base LM, three skill experts, accuracy matrix; cached by a stamp.

Layout of ``out`` (each model an ordinary Hugging Face directory, float32 safetensors)::

    base/ spatial/ arith/ format/   config.json, generation_config.json, model.safetensors, tokenizer*
    matrix.json                     accuracy matrix + merge rows (see matrix.py)
    zoo_stamp.json                  cache key; written last, so its presence means "complete"

The build writes into a sibling temp directory and renames it into place at the end: an
interrupted build never looks complete. Training is deterministic (explicit generators, fixed
thread count, deterministic algorithms): the same seed and settings give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import corpus
from .matrix import evaluate_zoo, format_matrix
from .settings import ZooSettings, stamp_for
from .tasks import SKILLS
from .tokenizer import save_tokenizer, train_tokenizer
from .train import TrainConfig, encode_pairs, init_model, make_config, train

STAMP = "zoo_stamp.json"
MATRIX = "matrix.json"
MODELS = ("base", *SKILLS)  # directory names: base, spatial, arith, format


@dataclass
class Zoo:
    """A finished zoo: model directories by name, the matrix (None when not evaluated)."""

    root: Path
    models: dict[str, Path]
    matrix: dict | None
    cached: bool
    seconds: float


def read_stamp(out: Path) -> dict | None:
    """The stamp of a complete zoo at ``out`` (None if absent or unreadable)."""
    try:
        return json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _load(out: Path, cached: bool, seconds: float) -> Zoo:
    matrix_path = out / MATRIX
    matrix = json.loads(matrix_path.read_text()) if matrix_path.is_file() else None
    return Zoo(out, {m: out / m for m in MODELS}, matrix, cached, seconds)


@contextmanager
def _reproducible(threads: int) -> Iterator[None]:
    """Fixed threads + deterministic kernels; the caller's global RNG state is left untouched."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _save_model(model, tokenizer, path: Path) -> None:
    model.save_pretrained(str(path))
    save_tokenizer(tokenizer, path)
    # Name the class every transformers version knows (5.x writes its internal backend name).
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _clear_stale_temps(out: Path) -> None:
    for tmp in out.parent.glob(f".{out.name}.building-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)  # a live build owns it
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def _train_all(tmp: Path, seed: int, s: ZooSettings, log: Callable[[str], None]):
    fresh = corpus.FreshDocs()
    tokenizer = train_tokenizer(corpus.tokenizer_texts(s.tokenizer_docs, seed, fresh), s.vocab_size, s.max_len)
    config = make_config(tokenizer, s.hidden_size, s.num_layers, s.num_heads, s.intermediate_size, s.max_len)
    model = init_model(config, seed)
    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    texts = corpus.base_texts(s.base_steps * s.batch_size, seed, fresh)
    losses = train(model, encode_pairs(tokenizer, [("", t) for t in texts], s.max_len),
                   TrainConfig(s.base_steps, s.base_lr, s.batch_size), pad, seed)
    log(f"base: {s.base_steps} steps, loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    _save_model(model, tokenizer, tmp / "base")
    sds = {"base": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    replay = encode_pairs(tokenizer, [("", t) for t in corpus.base_texts(4096, seed + 1, fresh)], s.max_len)
    for i, skill in enumerate(SKILLS, start=1):
        t0 = time.perf_counter()
        model.load_state_dict(sds["base"])
        steps, batch = s.expert_plan(skill)
        pairs = corpus.skill_pairs(skill, steps * batch, seed, fresh)
        losses = train(model, encode_pairs(tokenizer, pairs, s.max_len), TrainConfig(steps, s.expert_lr, batch),
                       pad, seed * 1000 + i, replay, s.replay_batch, s.replay_weight,
                       s.expert_trainable(skill))
        log(f"{skill}: {steps} steps, answer loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
        _save_model(model, tokenizer, tmp / skill)
        sds[skill] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, tokenizer, sds


def build_zoo(out: Path | str = "zoo", seed: int = 0, settings: ZooSettings | None = None,
              force: bool = False, log: Callable[[str], None] = print) -> Zoo:
    """Build (or reuse) the zoo at ``out``; returns its model paths and matrix."""
    out, settings = Path(out).resolve(), settings or ZooSettings()
    start = time.perf_counter()
    stamp = stamp_for(seed, settings)
    if not force and (read_stamp(out) or {}).get("key") == stamp["key"]:
        return _load(out, True, time.perf_counter() - start)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temps(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _reproducible(settings.threads):
            model, tokenizer, sds = _train_all(tmp, seed, settings, log)
            if settings.evaluate:
                t0 = time.perf_counter()
                matrix = evaluate_zoo(model, tokenizer, sds, {m: tmp / m for m in MODELS}, settings.grid, settings.grid_limit,
                                      settings.eval_batch_size, log)
                matrix["seed"] = seed
                log(f"evaluation: {time.perf_counter() - t0:.0f} s")
                (tmp / MATRIX).write_text(json.dumps(matrix, indent=1, sort_keys=True) + "\n")
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(out, False, time.perf_counter() - start)


__all__ = ["MODELS", "Zoo", "ZooSettings", "build_zoo", "format_matrix", "read_stamp"]
