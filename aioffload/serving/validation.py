"""Checks on a decoded request and the engine's SamplingParams built from it (pure, no I/O).

`refuse_unsupported` is the one place that says which OpenAI fields are declared but not
implemented: each is a 400 naming it unless it holds its neutral value (`suffix: ""`, `min_p: 0`,
`modalities: ["text"]`...), which is what some clients send by default. `sampling_params` maps the
rest onto the engine's `SamplingParams` (docs/engine-sampling.md has the table).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aioffload.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from aioffload.worker.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams, validate

MAX_STOP_STRINGS = 16


def _none_or(*neutral: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == n and type(v) is type(n) for n in neutral)


# field -> (is its value neutral?, why a non-neutral value is refused)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (_none_or(""), "suffix (insertion) is not supported by this server"),
    "min_p": (_none_or(0, 0.0), "min_p is not supported by this server; use top_p or top_k"),
    "modalities": (lambda v: v is None or v == ["text"], "only the 'text' modality is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported by the served model"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "functions": (lambda v: v is None, "the deprecated `functions` field is not supported; use `tools`"),
    "function_call": (lambda v: v is None, "the deprecated `function_call` field is not supported; use `tool_choice`"),
}  # fmt: skip


def refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """ApiError(400) naming the first declared-but-unimplemented field set to a non-neutral value."""
    declared = type(req).__struct_fields__
    for field, (neutral, why) in UNSUPPORTED.items():
        if field in declared and not neutral(getattr(req, field)):
            raise ApiError(400, f"{field}: {why}", field)


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    if not ids:
        raise ApiError(400, f"{param} must not be empty", param)
    limit = vocab_size if vocab_size else 1 << 31
    bad = next((t for t in ids if not 0 <= t < limit), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is out of range [0, {limit})", param)


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def completion_prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    """`prompt` as OpenAI takes it (a string, a list of strings, a token-id list, or a list of them)
    -> one prompt per choice. Type errors name the element (`prompt[1]`, `prompt[0][2]`)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt must not be empty", "prompt")
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", "prompt")
    if _is_id(prompt[0]):  # one prompt of token ids
        bad = next((i for i, t in enumerate(prompt) if not _is_id(t)), None)
        if bad is not None:
            raise ApiError(400, "token ids must be integers", f"prompt[{bad}]")
        return [list(prompt)]
    kind = type(prompt[0]) if isinstance(prompt[0], (str, list)) else None
    if kind is None:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of "
                       "token-id lists", "prompt[0]")  # fmt: skip
    out: list[str | list[int]] = []
    for i, p in enumerate(prompt):
        if not isinstance(p, kind):
            raise ApiError(400, f"prompt[{i}] must be a {'string' if kind is str else 'list of token ids'} like "
                           "prompt[0]", f"prompt[{i}]")  # fmt: skip
        if not p:
            raise ApiError(400, f"prompt[{i}] must not be empty", f"prompt[{i}]")
        if isinstance(p, list):
            bad_j = next((j for j, t in enumerate(p) if not _is_id(t)), None)
            if bad_j is not None:
                raise ApiError(400, "token ids must be integers", f"prompt[{i}][{bad_j}]")
        out.append(p)
    return out


def _logprobs(req: CompletionRequest | ChatCompletionRequest) -> tuple[int | None, int | None]:
    """(SamplingParams.logprobs, .prompt_logprobs): completions `logprobs: k` (and `echo`), chat
    `logprobs: true` with `top_logprobs: k`."""
    lp = req.logprobs
    if isinstance(req, ChatCompletionRequest):
        top = req.top_logprobs
        if lp is not None and not isinstance(lp, bool):
            raise ApiError(400, "logprobs is a boolean for chat completions; top_logprobs says how many "
                           "alternatives", "logprobs")  # fmt: skip
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
        if top and lp is not True:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return ((top or 0) if lp else None), None
    if lp is None or lp is False:
        return None, None
    if lp is True or not 0 <= lp <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_LOGPROBS}] for completions, got "
                       f"{lp!r}", "logprobs")  # fmt: skip
    return lp, lp if req.echo else None


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> sorted ((id, bias), ...); ids are checked against the vocabulary by
    the engine."""
    out = []
    for key, value in (bias or {}).items():
        if not key.isdigit() or not key.isascii():
            raise ApiError(400, f"logit_bias keys are token ids (decimal strings), got {key!r}", "logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ApiError(400, f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got "
                           f"{value} for {key}", "logit_bias")  # fmt: skip
        out.append((int(key), float(value)))
    return tuple(sorted(out))


def _choices(req: CompletionRequest | ChatCompletionRequest) -> tuple[int, int | None]:
    """(n, best_of); a stream cannot rank candidates before they end, so best_of > n is not streamed."""
    if req.n < 1:
        raise ApiError(400, f"n must be >= 1, got {req.n}", "n")
    best_of = getattr(req, "best_of", None)
    if best_of is None:
        return req.n, None
    if best_of < req.n:
        raise ApiError(400, f"best_of must be >= n ({req.n}), got {best_of}", "best_of")
    if req.stream and best_of > req.n:
        raise ApiError(400, "best_of > n cannot be streamed: candidates are ranked once all have ended",
                       "best_of")  # fmt: skip
    return req.n, best_of


def sampling_params(req: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_model_len: int,
                    default_max_tokens: int, prompt_param: str) -> SamplingParams:
    """Check ranges and lengths; build the engine's SamplingParams (no logits mask: the caller adds it)."""
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise ApiError(400, f"top_k must be >= 0 (0 = off), got {req.top_k}", "top_k")
    if req.seed is not None and not -(1 << 63) <= req.seed < (1 << 63):
        raise ApiError(400, "seed must fit in 64 bits", "seed")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise ApiError(400, f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    stop_ids = tuple(req.stop_token_ids or ())
    if any(not 0 <= t < (1 << 31) for t in stop_ids):
        raise ApiError(400, "stop_token_ids must be non-negative token ids", "stop_token_ids")
    if prompt_len > max_model_len - 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; at most {max_model_len - 1} fit in "
                       f"--max-model-len {max_model_len} with one output token", prompt_param)
    max_param, max_tokens = "max_tokens", req.max_tokens
    if getattr(req, "max_completion_tokens", None) is not None:
        max_param, max_tokens = "max_completion_tokens", req.max_completion_tokens  # type: ignore[union-attr]
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_model_len - prompt_len)
    elif max_tokens < 1:
        raise ApiError(400, f"{max_param} must be >= 1, got {max_tokens}", max_param)
    elif prompt_len + max_tokens > max_model_len:
        raise ApiError(400, f"{max_param}={max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                       f"--max-model-len {max_model_len}", max_param)
    n, best_of = _choices(req)
    logprobs, prompt_logprobs = _logprobs(req)
    if req.min_tokens is not None and not 0 <= req.min_tokens <= max_tokens:
        raise ApiError(400, f"min_tokens must be in [0, {max_param}={max_tokens}], got {req.min_tokens}",
                       "min_tokens")  # fmt: skip
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        n=n,
        best_of=best_of,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        min_tokens=req.min_tokens or 0,
    )
    return checked(params)


def checked(params: SamplingParams) -> SamplingParams:
    """The engine's own rules (penalty ranges, ...), as a 400 naming the field."""
    try:
        validate(params)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split(":", 1)[0]) from None
    return params
