"""A tiny checkpoint that has learnt one tool call, so the real server can be tested on real output.

`make_tool_model(root)` copies the demo model's tokenizer, gives it the Qwen 2.5 chat template
(tests/data), and trains a 2-layer Llama from scratch until greedy decoding of the rendered
prompt (TOOL_MESSAGES with TOOLS) yields exactly TOOL_CALL_TEXT then eos. A few seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from aioffload.checkpoint.tokenizer import Tokenizer
from aioffload.config import DEMO_MODEL

DEMO = Path(DEMO_MODEL)
TEMPLATE = (Path(__file__).parent / "data" / "qwen2_5_chat_template.jinja").read_text()
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
TOOL_MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _tokenizer_folder(path: Path) -> Tokenizer:
    path.mkdir(parents=True)
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(DEMO / name, path / name)
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return Tokenizer.from_dir(path)


def make_tool_model(root: Path, max_steps: int = 600) -> Path:
    import transformers

    path = root / "tool-model"
    tok = _tokenizer_folder(path)
    prompt = tok.encode(tok.apply_chat_template(TOOL_MESSAGES, True, TOOLS), add_special_tokens=False)
    target = tok.encode(TOOL_CALL_TEXT, add_special_tokens=False) + [tok.eos_token_ids[0]]
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=list(tok.eos_token_ids), tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(max_steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24 and _greedy(model, prompt, len(target)) == target:
            break
    else:
        raise RuntimeError(f"the tool model did not learn its call in {max_steps} steps (loss {loss.item():.3f})")
    model.save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
