"""lm-eval's ``VLLM`` model, tuned for one engine scored many times (imports vLLM: load lazily).

Only :mod:`evolve.evaluation.vllm` imports this module, inside ``VLLMEvaluator.__init__``, so
nothing imports vLLM (seconds, and absent from the main venv) until a vLLM evaluator is built.
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.vllm_causallms import VLLM
from vllm import SamplingParams, TokensPrompt

from evolve.evaluation.loop import ResidentLM

__all__ = ["ResidentVLLM"]


class ResidentVLLM(ResidentLM, VLLM):
    """lm-eval's ``VLLM`` (it builds the ``LLM`` as ``self.model``) with progress bars optional.

    lm-eval's evaluate() never passes ``disable_tqdm``, and VLLM asks the engine for its own
    progress bar whenever the batch size is "auto"; both follow ``show_progress`` here.  Scoring
    is lm-eval's own: loglikelihood via ``prompt_logprobs``, generate_until via ``generate``.
    """

    def _model_generate(
        self,
        requests: list[list[int]],
        generate: bool = False,
        sampling_params: Any = None,
    ) -> Any:
        # VLLM._model_generate's single-engine path, with the engine's progress bar switchable.
        if self.data_parallel_size > 1:
            return super()._model_generate(requests, generate=generate, sampling_params=sampling_params)
        if not generate or sampling_params is None:
            sampling_params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(requests)
        return self.model.generate(
            [TokensPrompt(prompt_token_ids=request) for request in requests],
            sampling_params=sampling_params,
            use_tqdm=self.show_progress,
            lora_request=self.lora_request,
        )

