"""Pushing merged weights into a running vLLM engine: the worker side.

:class:`WeightPush` is handed to vLLM as ``worker_extension_cls``: vLLM mixes it into its worker
class, and ``LLM.collective_rpc("push_weights", args=(state_dict,))`` then runs
:meth:`WeightPush.push_weights` on every worker (one, here).  The driver side is
:class:`evolve.evaluation.vllm.VLLMEvaluator`.

Why through the worker's ``reload_weights`` and not the model's ``load_weights`` directly:
after loading, vLLM post-processes some layers into kernel formats (``process_weights_after_loading``;
on CPU the linear layers are repacked for the oneDNN/AVX kernels and their checkpoint-format
``weight`` parameter is left empty), so a plain ``model.load_weights(...)`` on a running engine
fails with "Attempted to load weight ... into parameter (torch.Size([0]))".  ``reload_weights``
(vllm.model_executor.model_loader.reload) restores each layer's checkpoint-format parameters,
calls the model's own ``load_weights`` on them, re-runs the post-processing and copies the
result into the ORIGINAL kernel tensors, so every pointer the engine captured (CUDA graphs, the
CPU kernels' packed buffers) stays valid.  It is in place: no engine restart, no disk.

This module is imported inside vLLM's worker; it imports nothing from vLLM itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch

__all__ = ["WeightPush"]

Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


class WeightPush:
    """Worker mixin (vLLM ``worker_extension_cls``): in-place weight updates and a fingerprint.

    Methods run inside vLLM's worker, where ``self`` is the worker (it has ``reload_weights``
    and ``model_runner``).  Their names must not clash with the worker's own attributes: vLLM
    refuses an extension that would shadow one.
    """

    def push_weights(self, weights: Weights) -> dict[str, Any]:
        """Load checkpoint-format ``weights`` (name -> tensor, HF names) into the running model.

        Tensors may have any floating dtype and live on any device; vLLM's weight loaders copy
        (and cast) them into the engine's own parameters.  Every vLLM layer touched must get all
        of its tensors (a layer is rebuilt from what it is given: one of q/k/v alone leaves the
        other two uninitialised); the driver checks that (``VLLMEvaluator.push_weights``).
        Returns ``{"tensors", "seconds"}``.
        TypeError when the values are not tensors: across processes vLLM's RPC serialises
        tensors as nested lists, so the push only works with the engine in-process
        (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one worker).
        """
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        for name, tensor in items:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"push_weights: {name!r} arrived as {type(tensor).__name__}, not a tensor; the "
                    "in-place push needs the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, "
                    "tensor_parallel_size=1)"
                )
        start = time.perf_counter()
        self.reload_weights(weights_iterator=items, is_checkpoint_format=True)  # type: ignore[attr-defined]
        return {"tensors": len(items), "seconds": time.perf_counter() - start}

    def packed_modules(self) -> dict[str, list[str]]:
        """The model's ``packed_modules_mapping``: fused module -> the checkpoint modules it
        holds (``qkv_proj: [q_proj, k_proj, v_proj]``, ``gate_up_proj: [gate_proj, up_proj]``)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        mapping = getattr(model, "packed_modules_mapping", None) or {}
        return {fused: list(parts) for fused, parts in mapping.items()}

    def weights_fingerprint(self) -> dict[str, float]:
        """``{parameter name: float64 sum}`` of the engine's parameters as they are now (tests).

        Kernel-format parameters (repacked, possibly empty) are reported as they are stored, so
        compare fingerprints of one engine before and after a push, not across engines.
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        with torch.no_grad():
            return {name: float(p.detach().double().sum()) for name, p in model.named_parameters()}
