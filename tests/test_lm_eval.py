"""An evaluation harness nobody here wrote: EleutherAI's lm-eval, `local-completions` against
`aioffload serve` on the demo model, must give the accuracy and per-item log-likelihoods (within
1e-3) of lm-eval's own `hf` backend on the same folder, on a local 12-item multiple-choice task
(tests/data/lm_eval). No network: every Hugging Face offline switch is set.

What local-completions needs of the server (lm-eval 0.4.13, `LocalCompletionsAPI`): a POST
/v1/completions with `prompt` = the token ids of context + continuation (its own Hugging Face
tokenizer of the model folder, no BOS added), `echo: true`, `logprobs: 1`, `max_tokens: 1`,
`temperature: 0`, `seed`; it reads `choices[i].logprobs.token_logprobs[ctxlen:-1]` (so the
prompt tokens' log-probabilities, echoed, the first one null) and `top_logprobs[ctxlen:-1]`
(one {token: logprob} dict per position, for is_greedy). echo with prompt logprobs is the
sampler's second part of issue 13: until it lands the server refuses `logprobs` with a 400, and
the comparison is an expected failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from server_proc import DEMO, REPO, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RUNNER = str(Path(__file__).resolve().parent / "lm_eval_run.py")


def offline_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(tmp / "hf"), "HF_DATASETS_CACHE": str(tmp / "datasets"), "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip


def lm_eval(model: str, model_args: str, tmp: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, RUNNER, model, model_args], cwd=REPO, env=offline_env(tmp),
                          capture_output=True, text=True, timeout=800)  # fmt: skip
    if proc.returncode == 3:  # the server refused a request: what the xfail below expects, for now
        refused = json.loads(proc.stdout.strip().splitlines()[-1])
        param = json.loads(refused["body"])["error"]["param"]
        if refused["http_error"] == 400 and param in ("logprobs", "echo"):
            raise requests.HTTPError(f"HTTP 400 on {param}: {refused['body']}")
        raise RuntimeError(f"the server refused lm-eval for another reason: {refused}")
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hf_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return lm_eval("hf", f"pretrained={DEMO},dtype=float32", tmp_path_factory.mktemp("lm_eval_hf"))


def test_hf_backend_runs_the_local_task(hf_result: dict[str, Any]) -> None:
    lls = hf_result["loglikelihoods"]
    assert len(lls) == 12 and all(len(choices) == 4 for choices in lls)
    assert all(ll < 0 for choices in lls for ll in choices)
    # acc is the share of items whose answer has the highest log-likelihood: recompute it from them.
    answers = [json.loads(line)["answer"] for line in (REPO / "tests/data/lm_eval/demo_mc.jsonl").open()]
    acc = sum(max(range(4), key=choices.__getitem__) == a for choices, a in zip(lls, answers)) / 12
    assert hf_result["acc"] == pytest.approx(acc)
    assert acc > 0.25  # the demo model knows a little Python: better than a uniform guess


def test_local_completions_request_shape() -> None:
    """What lm-eval will send us for a log-likelihood (the contract part two has to meet)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    api = object.__new__(LocalCompletionsAPI)
    api.model = "demo"
    payload = api._create_payload([[5, 6, 7], [8, 9]], generate=False)
    assert payload["prompt"] == [[5, 6, 7], [8, 9]] and payload["echo"] is True and payload["logprobs"] == 1
    assert payload["max_tokens"] == 1 and payload["temperature"] == 0 and payload["model"] == "demo"
    fake = {"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, -1.0, -2.0, -0.5],
                                                  "top_logprobs": [None, {"a": -1.0}, {"b": -1.5}, {"c": -0.5}]}}]}
    assert LocalCompletionsAPI.parse_logprobs(fake, ctxlens=[2]) == [(-2.0, False)]


@pytest.mark.xfail(strict=True, raises=requests.HTTPError,
                   reason="needs echo + prompt logprobs (issue 13, the sampler's part): the server answers 400")
def test_local_completions_matches_hf(hf_result: dict[str, Any], tmp_path: Path) -> None:
    with start_server("--max-model-len", "512") as server:
        args = (f"base_url={server.url}/v1/completions,model=demo,tokenizer_backend=huggingface,tokenizer={DEMO},"
                "max_retries=1,num_concurrent=1")
        served = lm_eval("local-completions", args, tmp_path)
    assert served["acc"] == hf_result["acc"] and served["acc_norm"] == hf_result["acc_norm"]
    for ours, theirs in zip(served["loglikelihoods"], hf_result["loglikelihoods"], strict=True):
        assert ours == pytest.approx(theirs, abs=1e-3)
