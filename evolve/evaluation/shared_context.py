"""Scoring loglikelihood requests that share a context in one forward pass (HF backend).

A multiple-choice task sends one (context, continuation) request per choice.  lm-eval's HFLM
runs each request as its own sequence, so the context is computed once per choice (it merges
only choices that are a single token).  Here all requests with the same context tokens become
ONE packed row: the context, then the continuations arranged as a prefix tree (choices that
start alike share nodes), with a 4D attention mask under which each tree node sees the context
and its own ancestors only, and position ids that continue from the context.  Every scored
token then gets the logits it would get in its own sequence (up to floating-point summation
order) for roughly ``1 / choices`` of the compute.

An evolve worker scores the same requests for every candidate, so the packed batches of a
request list are built once and cached; per call only the forward passes run.

Packing needs an attention implementation that honours a custom 4D mask ("sdpa" or "eager");
:class:`SharedContextLM` also checks it once per process against lm-eval's own path on real
requests and falls back to that path (with a warning) when they disagree.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from evolve.evaluation.loop import check_finite

log = logging.getLogger(__name__)

# (request strings, context tokens, continuation tokens), as lm-eval passes them.
Request = tuple[Any, list[int], list[int]]

MASKABLE_ATTENTION = ("sdpa", "eager")
_PLAN_CACHE_SIZE = 4
MASK_BUDGET_BYTES = 256 << 20  # attention masks kept per cached plan; larger ones are rebuilt
_CHECK_SAMPLE = 48


@dataclass
class PackedBatch:
    """One forward pass: packed rows plus where to read each scored token's log-probability.

    ``mask`` ([B, 1, T, T]: bool, True = may attend, or additive float) is kept only while the
    plan's masks fit its memory budget; otherwise it is None and rebuilt from ``layout`` for
    each pass (masks grow with T^2: long contexts would otherwise pin gigabytes).
    """

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    layout: list["_Row"]
    mask: Optional[torch.Tensor]
    rows: torch.Tensor  # [S] row of each scored token's logits
    cols: torch.Tensor  # [S] column of each scored token's logits
    targets: torch.Tensor  # [S] the token whose log-probability is read
    owner: torch.Tensor  # [S] index of the request it belongs to


@dataclass
class PackedPlan:
    """How to score a request list: packed batches, plus the requests left to lm-eval's path."""

    batches: list[PackedBatch]
    packed: list[int]  # request indices scored by ``batches``
    rest: list[int]  # too long to pack (lm-eval truncates those from the left)
    tokens: int  # input tokens of all batches, padding included
    mask_dtype: Optional[torch.dtype] = None  # None: bool masks (sdpa); else additive (eager)


@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    parents: list[int]  # -1: a context token; else the column of the parent tree node
    context_len: int
    scored: list[tuple[int, int, int]]  # (column, target token, request index)


def _pack_group(context: Sequence[int], members: Sequence[tuple[int, Sequence[int]]]) -> _Row:
    """The packed row of one context and its continuations (request index, tokens)."""
    n = len(context)
    row = _Row(list(context), list(range(n)), [-1] * n, n, [])
    node_of: dict[tuple[int, ...], int] = {}
    for index, cont in members:
        for j, token in enumerate(cont):
            # The logits predicting cont[j] sit at the last context token (j == 0) or at the
            # tree node holding cont[:j].
            column = n - 1 if j == 0 else node_of[tuple(cont[:j])]
            row.scored.append((column, token, index))
            if j + 1 == len(cont):
                break  # the last token is only a target, never an input
            key = tuple(cont[: j + 1])
            if key not in node_of:
                node_of[key] = len(row.tokens)
                row.tokens.append(token)
                row.positions.append(n + j)
                row.parents.append(-1 if j == 0 else column)
    return row


def _row_mask(row: _Row, width: int, mask: torch.Tensor) -> None:
    """Fill ``mask`` ([width, width] bool, all False): causal over the context,
    context + ancestors + self over the tree nodes, self only for padding."""
    n = row.context_len
    mask[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril_()
    for column in range(n, len(row.tokens)):
        parent = row.parents[column]
        if parent < 0:
            mask[column, :n] = True
        else:
            mask[column] = mask[parent]
        mask[column, column] = True
    padding = torch.arange(len(row.tokens), width)
    mask[padding, padding] = True  # padding attends to itself only (no all-masked rows)


def build_mask(layout: Sequence[_Row], width: int, mask_dtype: Optional[torch.dtype],
               device: torch.device) -> torch.Tensor:
    """The [B, 1, width, width] attention mask of packed rows, on ``device``."""
    mask = torch.zeros((len(layout), 1, width, width), dtype=torch.bool)
    for r, row in enumerate(layout):
        _row_mask(row, width, mask[r, 0])
    if mask_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill_(~mask, torch.finfo(mask_dtype).min)
    return mask.to(device)


def plan_requests(
    requests: Sequence[Request], *, max_length: int, batch_size: int, pad_id: int = 0,
    window: Optional[int] = None, device: torch.device = torch.device("cpu"),
    mask_dtype: Optional[torch.dtype] = None, mask_budget: int = MASK_BUDGET_BYTES,
) -> PackedPlan:
    """Group ``requests`` by context, pack each group into a row and the rows into batches.

    A request whose context plus continuation exceeds ``max_length + 1`` tokens (lm-eval would
    truncate it from the left), or, with a sliding-window model, whose row would be longer
    than ``window``, is left in ``rest``.  Rows are sorted longest first, ``batch_size`` per batch.
    Batches are placed on ``device``; their masks are kept there while they total at most
    ``mask_budget`` bytes (the rest are rebuilt per pass).
    """
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    rest: list[int] = []
    for index, (_, context, cont) in enumerate(requests):
        if not context or not cont or len(context) + len(cont) > max_length + 1:
            rest.append(index)
            continue
        groups.setdefault(tuple(context), []).append((index, cont))
    rows: list[_Row] = []
    for context, members in groups.items():
        row = _pack_group(context, members)
        if window is not None and len(row.tokens) > window:
            rest.extend(index for index, _ in members)
            continue
        rows.append(row)
    rows.sort(key=lambda r: -len(r.tokens))
    batches = [_batch(rows[i : i + batch_size], pad_id, device) for i in range(0, len(rows), batch_size)]
    itemsize = mask_dtype.itemsize if mask_dtype is not None else 1
    spent = 0
    for b in batches:
        size = itemsize * len(b.layout) * b.input_ids.shape[1] ** 2
        if spent + size <= mask_budget:
            b.mask = build_mask(b.layout, b.input_ids.shape[1], mask_dtype, device)
            spent += size
    return PackedPlan(
        batches=batches,
        packed=sorted({index for row in rows for _, _, index in row.scored}),
        rest=sorted(rest),
        tokens=sum(b.input_ids.numel() for b in batches),
        mask_dtype=mask_dtype,
    )


def _batch(rows: Sequence[_Row], pad_id: int, device: torch.device) -> PackedBatch:
    width = len(rows[0].tokens)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    where: list[tuple[int, int, int, int]] = []
    for r, row in enumerate(rows):
        ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
        positions[r, : len(row.positions)] = torch.tensor(row.positions)
        where.extend((r, column, target, index) for column, target, index in row.scored)
    table = torch.tensor(where, dtype=torch.long).to(device)
    return PackedBatch(ids.to(device), positions.to(device), list(rows), None,
                       table[:, 0], table[:, 1], table[:, 2], table[:, 3])


def score_plan(
    model: torch.nn.Module, plan: PackedPlan, num_requests: int, *,
    softmax_dtype: Optional[torch.dtype] = None, autocast_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan's batches: (sum of continuation log-probs, all-tokens-greedy) per request.

    Entries of requests not in ``plan.packed`` are left at 0 / True.
    """
    device = plan.batches[0].input_ids.device if plan.batches else torch.device("cpu")
    totals: Optional[torch.Tensor] = None
    misses = torch.zeros(num_requests, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=autocast_dtype,
                                         enabled=autocast_dtype is not None):
        for b in plan.batches:
            mask = b.mask
            if mask is None:
                mask = build_mask(b.layout, b.input_ids.shape[1], plan.mask_dtype, device)
            logits = model(input_ids=b.input_ids, attention_mask=mask, position_ids=b.position_ids,
                           use_cache=False).logits
            logprobs = F.log_softmax(logits[b.rows, b.cols], dim=-1, dtype=softmax_dtype)
            picked = logprobs.gather(1, b.targets[:, None]).squeeze(1)
            if totals is None:
                totals = torch.zeros(num_requests, dtype=picked.dtype, device=device)
            totals.index_add_(0, b.owner, picked)
            misses.index_add_(0, b.owner, (logprobs.argmax(dim=-1) != b.targets).long())
    if totals is None:
        totals = torch.zeros(num_requests, device=device)
    return totals.cpu(), (misses == 0).cpu()


def _agree(ours: tuple[float, bool], theirs: tuple[float, bool], sixteen_bit: bool) -> bool:
    atol, rtol = (0.05, 0.01) if sixteen_bit else (1e-3, 1e-4)
    return abs(ours[0] - theirs[0]) <= atol + rtol * abs(theirs[0])


class SharedContextLM:
    """Mixin for lm-eval's HFLM (put it before HFLM in the bases): ``_loglikelihood_tokens``
    scores requests that share a context in one packed row (see the module docstring).

    ``share_context = False`` turns it off.  The first call that packs anything also runs a
    sample of its requests through lm-eval's own path; on disagreement packing is switched off
    for good (a warning says why) and that call's results come from lm-eval's path.
    """

    share_context = True
    _packing_checked = False

    def _packing_supported(self) -> Optional[str]:
        """None when packing can run; else why not."""
        if getattr(self, "backend", "causal") != "causal":
            return "not a causal LM"
        if not isinstance(getattr(self, "batch_size", None), int):
            return "batch size is not a fixed number"
        implementation = getattr(self.model.config, "_attn_implementation", None)
        if implementation not in MASKABLE_ATTENTION:
            return f"attention implementation {implementation!r} takes no custom 4D mask"
        return None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        if not self.share_context or not requests or self._packing_supported() is not None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        plan = self._plan_for(requests)
        if not plan.batches:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        try:
            totals, greedy = score_plan(
                self.model, plan, len(requests), softmax_dtype=getattr(self, "softmax_dtype", None),
                autocast_dtype=getattr(self, "mixed_precision_dtype", None),
            )
        except (TypeError, ValueError, RuntimeError) as exc:
            if self._packing_checked:
                raise
            return self._give_up(f"the model rejected a packed batch ({type(exc).__name__}: {exc})",
                                 requests, disable_tqdm, override_bs)
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        for index in plan.packed:
            results[index] = (float(totals[index]), bool(greedy[index]))
        if not self._packing_checked:
            problem = self._check(requests, plan, results)
            if problem is not None:
                return self._give_up(problem, requests, disable_tqdm, override_bs)
        if plan.rest:
            others = super()._loglikelihood_tokens([requests[i] for i in plan.rest], disable_tqdm=True,
                                                   override_bs=override_bs)
            for index, answer in zip(plan.rest, others):
                results[index] = answer
        for (request_str, _, _), answer in zip(requests, results):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def _plan_for(self, requests: Sequence[Request]) -> PackedPlan:
        key = tuple((tuple(context), tuple(cont)) for _, context, cont in requests)
        plans: dict = self.__dict__.setdefault("_packed_plans", {})
        plan = plans.pop(key, None)
        if plan is None:
            config = self.model.config
            window = getattr(config, "sliding_window", None)
            eager = getattr(config, "_attn_implementation", None) == "eager"
            plan = plan_requests(
                requests, max_length=self.max_length, batch_size=int(self.batch_size), pad_id=0,
                window=window if isinstance(window, int) and window > 0 else None, device=self.device,
                mask_dtype=next(self.model.parameters()).dtype if eager else None,
            )
            if len(plans) >= _PLAN_CACHE_SIZE:
                plans.pop(next(iter(plans)))
        plans[key] = plan  # most recently used last
        return plan

    def _check(self, requests: Sequence[Request], plan: PackedPlan,
               results: Sequence[Optional[tuple[float, bool]]]) -> Optional[str]:
        """Compare a sample of packed results with lm-eval's own path; None when they agree."""
        counts = Counter(tuple(requests[i][1]) for i in plan.packed)
        shared = [i for i in plan.packed if counts[tuple(requests[i][1])] > 1] or plan.packed
        sample = shared[:: max(1, len(shared) // _CHECK_SAMPLE)][:_CHECK_SAMPLE]
        reference = super()._loglikelihood_tokens([requests[i] for i in sample], disable_tqdm=True)
        # A model whose activations overflow gives NaN on both paths: that says nothing about
        # packing (NaN != NaN), so the check is left for a later, finite candidate.
        check_finite([r[0] for r in results if r is not None] + [r[0] for r in reference])
        dtype = next(self.model.parameters()).dtype
        sixteen_bit = dtype in (torch.float16, torch.bfloat16) or getattr(self, "mixed_precision_dtype", None) is not None
        self._packing_checked = True
        for index, theirs in zip(sample, reference):
            ours = results[index]
            if ours is None or not _agree(ours, theirs, sixteen_bit):
                return f"packed log-likelihood {ours} differs from lm-eval's {theirs}"
        return None

    def _give_up(self, why: str, requests, disable_tqdm: bool, override_bs: Optional[int]):
        log.warning("shared-context scoring switched off: %s; using lm-eval's per-request path", why)
        self.share_context = False
        self._packing_checked = True
        self.__dict__.pop("_packed_plans", None)
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
