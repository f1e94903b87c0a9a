"""Child process for bench/engines.py: vLLM's offline engine at several batch sizes.

vLLM starts its engine in a child process, so it needs a ``__main__`` guard and is kept out
of the parent benchmark (which also times the torch engine in-process). Prints one JSON line.

    python bench/_vllm_offline.py MODEL_DIR PROMPTS_JSON TOKENS CONCURRENCIES [parity|defaults]

``parity`` (the default): the project's parity settings, float32 weights and eager mode, as
the torch engine runs on the CPU. ``defaults``: vLLM as users run it, every engine setting at
vLLM's default (its own dtype choice, compilation on); only the KV cache's size is set.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model, prompts_path, tokens, concurrencies = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    mode = sys.argv[5] if len(sys.argv) > 5 else "parity"
    if mode not in ("parity", "defaults"):
        raise SystemExit(f"mode {mode!r}: expected parity or defaults")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(open(prompts_path).read())
    t0 = time.perf_counter()
    if mode == "parity":
        llm = LLM(model=model, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2, seed=0)
    else:
        llm = LLM(model=model, seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
    config = llm.llm_engine.model_config
    out = {"mode": mode, "load_s": load_s, "dtype": str(config.dtype), "enforce_eager": config.enforce_eager,
           "tok_s": {}}
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
