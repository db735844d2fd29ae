"""Run lm-eval's aioffload_demo_mc task (tests/data/lm_eval) and print one JSON line:
{"acc": ..., "acc_norm": ..., "loglikelihoods": [[per choice] per doc]}, or, exit status 3,
{"http_error": status, "body": the server's answer} when the server refused a request.

    python tests/lm_eval_run.py hf pretrained=DIR,dtype=float32
    python tests/lm_eval_run.py local-completions base_url=URL/v1/completions,model=demo,...

A script, run in a subprocess by tests/test_lm_eval.py, so the offline switches (HF_HUB_OFFLINE
and friends, read when huggingface_hub and datasets are imported) hold for the whole run and
lm-eval's global state stays out of the test process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"


def main(model: str, model_args: str) -> int:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["aioffload_demo_mc"],
                                  task_manager=TaskManager(include_path=str(TASKS)), device="cpu", batch_size=1,
                                  log_samples=True)  # fmt: skip
    result = out["results"]["aioffload_demo_mc"]
    samples = sorted(out["samples"]["aioffload_demo_mc"], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    print(json.dumps({"acc": result["acc,none"], "acc_norm": result["acc_norm,none"], "loglikelihoods": lls}))
    return 0


if __name__ == "__main__":
    import requests

    try:
        sys.exit(main(sys.argv[1], sys.argv[2]))
    except requests.HTTPError as e:  # the server refused a request: say which, and what it answered
        body = e.response.text if e.response is not None else ""
        print(json.dumps({"http_error": e.response.status_code if e.response is not None else None, "body": body}))
        sys.exit(3)
