"""An evaluation harness nobody here wrote: EleutherAI's lm-eval, `local-completions` against
`aioffload serve` on the demo model, must give the accuracy and per-item log-likelihoods (within
1e-3) of lm-eval's own `hf` backend on the same folder, on a local 12-item multiple-choice task
(tests/data/lm_eval). No network: every Hugging Face offline switch is set.

What local-completions needs of the server (lm-eval 0.4.13, `LocalCompletionsAPI`): a POST
/v1/completions with `prompt` = the token ids of context + continuation (its own Hugging Face
tokenizer of the model folder), `echo: true`, `logprobs: 1`, `max_tokens: 1`, `temperature: 0`,
`seed`; it reads `choices[i].logprobs.token_logprobs[ctxlen:-1]` (so the prompt tokens'
log-probabilities, echoed, the first one null) and `top_logprobs[ctxlen:-1]` (one {token: logprob}
dict per position, for is_greedy).

The two backends must score the same tokens: the `hf` backend encodes with the tokenizer's own
defaults (the demo's `add_bos_token: true` puts BOS first), while local-completions adds no BOS
unless told, so it runs with `add_bos_token=True` (test_both_backends_score_the_text_after_bos).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
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
    if proc.returncode == 3:  # the server refused a request: say what it answered
        raise RuntimeError(f"the server refused lm-eval: {proc.stdout.strip().splitlines()[-1]}")
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


def test_both_backends_score_the_text_after_bos() -> None:
    import transformers
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    bos = transformers.AutoTokenizer.from_pretrained(DEMO).bos_token_id
    hf_ids = transformers.AutoTokenizer.from_pretrained(DEMO).encode("A list is")  # the hf backend's encode
    api = LocalCompletionsAPI(base_url="http://127.0.0.1:9/v1/completions", model="demo", tokenizer=DEMO,
                              tokenizer_backend="huggingface", add_bos_token=True)  # fmt: skip
    assert hf_ids[0] == bos and api.tok_encode("A list is") == hf_ids


def test_local_completions_matches_hf(hf_result: dict[str, Any], tmp_path: Path) -> None:
    with start_server("--max-model-len", "512") as server:
        args = (f"base_url={server.url}/v1/completions,model=demo,tokenizer_backend=huggingface,tokenizer={DEMO},"
                "max_retries=1,num_concurrent=1,add_bos_token=True")
        served = lm_eval("local-completions", args, tmp_path)
    assert served["acc"] == hf_result["acc"] and served["acc_norm"] == hf_result["acc_norm"]
    for ours, theirs in zip(served["loglikelihoods"], hf_result["loglikelihoods"], strict=True):
        assert ours == pytest.approx(theirs, abs=1e-3)
