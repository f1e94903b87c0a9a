"""One request means one thing on every engine: vLLM's sampling fields on the torch engine.

The torch engine implements vLLM's further sampling fields (penalties, logit_bias, min_p,
min_tokens, stop_token_ids, include_stop_str_in_output, allowed_token_ids) with vLLM's
semantics, and answers 400 naming any vLLM field it does not implement, rather than
dropping it. The fast tests check each field's effect and each refusal through the
endpoint; the slow one sends the same greedy request to ``--engine torch`` and to
``--engine vllm`` (our endpoint in front of one real vLLM child for the whole module) and
wants the same answer, or the torch engine's 400. Also here: vLLM's ``/detokenize``,
``/tokenizer_info`` and ``/version``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from assist.engine import TorchEngine
from assist.server import EngineBackend, UpstreamBackend, create_app
from assist.testing import running_server

PROMPT = "Question: Mia has 5 apples. She eats 2. How many apples does Mia have now?\nAnswer:"
CHAT = [{"role": "user", "content": "Pax has 2 stickers. First Pax loses 1. How many stickers does Pax have now?"}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def rlhf(trained_run: tuple[Path, float]) -> Path:
    return trained_run[0] / "rlhf"


@pytest.fixture(scope="module")
def torch_url(rlhf: Path) -> Iterator[str]:
    engine = TorchEngine(rlhf, max_batch=8, name="assistant")
    try:
        with running_server(create_app(EngineBackend(engine), owns_backend=False)) as url:
            yield url
    finally:
        engine.close()


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json={"model": "assistant", **body}, timeout=120)


def _complete(url: str, **fields: Any) -> httpx.Response:
    return _post(url, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS, **fields})


def _chat(url: str, **fields: Any) -> httpx.Response:
    return _post(url, "/v1/chat/completions", {"messages": CHAT, "temperature": 0, "max_tokens": MAX_TOKENS,
                                               **fields})


def _ids(url: str, text: str) -> list[int]:
    return list(_post(url, "/tokenize", {"prompt": text}).json()["tokens"])


@pytest.fixture(scope="module")
def baseline(torch_url: str, rlhf: Path) -> dict[str, Any]:
    """The plain greedy completion's choice with its token ids (logprobs give them), and the
    id of a special token (the tool-call marker)."""
    from transformers import AutoTokenizer

    body = _complete(torch_url, logprobs=0).json()
    choice = body["choices"][0]
    tokens = [_ids(torch_url, t) for t in choice["logprobs"]["tokens"]]
    assert all(len(t) == 1 for t in tokens), tokens  # each piece is one token
    marker = AutoTokenizer.from_pretrained(rlhf).convert_tokens_to_ids("<tool_call>")
    return {"text": choice["text"], "ids": [t[0] for t in tokens], "usage": body["usage"], "marker": marker}


# -- each field's effect, through the endpoint ------------------------------------------------
def test_logit_bias_and_allowed_token_ids_steer_the_greedy_pick(torch_url, baseline):
    forced = baseline["ids"][0] + 1
    out = _complete(torch_url, logit_bias={str(forced): 100}).json()["choices"][0]
    assert out["text"] == _post(torch_url, "/detokenize", {"tokens": [forced] * MAX_TOKENS}).json()["prompt"]
    first = baseline["ids"][0]
    out = _complete(torch_url, logit_bias={str(first): -100}, max_tokens=1).json()["choices"][0]
    assert out["text"] and _ids(torch_url, out["text"]) != [first]
    # two ids whose pieces are whole tokens (the baseline's own), read back one piece at a
    # time: the text of arbitrary ids (lone bytes) need not re-tokenize into the same ids
    allowed = sorted(set(baseline["ids"]))[:2]
    out = _complete(torch_url, allowed_token_ids=allowed, max_tokens=4, logprobs=0).json()["choices"][0]
    picked = [_ids(torch_url, t) for t in out["logprobs"]["tokens"]]
    assert picked and all(len(p) == 1 and p[0] in allowed for p in picked), picked


def test_penalties_change_a_repetitive_answer_and_neutral_values_change_nothing(torch_url, baseline):
    neutral = _complete(torch_url, presence_penalty=0, frequency_penalty=0, repetition_penalty=1, min_p=0,
                        min_tokens=0, stop_token_ids=[], include_stop_str_in_output=False, use_beam_search=False,
                        skip_special_tokens=True, bad_words=[]).json()["choices"][0]
    assert neutral["text"] == baseline["text"]
    if len(set(baseline["ids"])) < len(baseline["ids"]):  # a repeated token: penalties must move it
        for field, value in (("presence_penalty", 2.0), ("frequency_penalty", 2.0), ("repetition_penalty", 3.0)):
            out = _complete(torch_url, **{field: value}).json()["choices"][0]
            assert out["text"] != baseline["text"], field


def test_stop_token_ids_min_tokens_and_include_stop_str_in_output(torch_url, baseline):
    ids, text = baseline["ids"], baseline["text"]
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    out = _complete(torch_url, stop_token_ids=[ids[k]]).json()
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == k + 1
    assert out["choices"][0]["text"] == _post(torch_url, "/detokenize", {"tokens": ids[:k]}).json()["prompt"]
    kept = _complete(torch_url, stop_token_ids=[ids[k]], include_stop_str_in_output=True).json()["choices"][0]
    assert kept["text"] == _post(torch_url, "/detokenize", {"tokens": ids[:k + 1]}).json()["prompt"]
    # a stop string: cut before it, or kept through its end
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        at = text.index(stop)
        assert _complete(torch_url, stop=[stop]).json()["choices"][0]["text"] == text[:at]
        assert _complete(torch_url, stop=[stop], include_stop_str_in_output=True).json()["choices"][0]["text"] == \
            text[:at + len(stop)]
    # min_tokens: no stop token before it
    out = _complete(torch_url, stop_token_ids=[ids[k]], min_tokens=MAX_TOKENS).json()
    assert out["usage"]["completion_tokens"] == MAX_TOKENS
    chat = _chat(torch_url, max_tokens=64).json()
    if chat["choices"][0]["finish_reason"] == "stop":  # it ended on eos: min_tokens goes past it
        n = chat["usage"]["completion_tokens"] + 2
        longer = _chat(torch_url, max_tokens=n + 2, min_tokens=n).json()
        assert longer["usage"]["completion_tokens"] >= n


def test_special_tokens_are_left_out_of_the_text_unless_asked_for(torch_url, baseline):
    """vLLM's skip_special_tokens (default true): a special token the model writes (forced
    here with logit_bias) is not in the text; false keeps it."""
    force = {"logit_bias": {str(baseline["marker"]): 100}}
    for send, text in ((_complete, lambda c: c["text"]), (_chat, lambda c: c["message"]["content"])):
        skipped = send(torch_url, **force).json()
        assert text(skipped["choices"][0]) == "" and skipped["usage"]["completion_tokens"] == MAX_TOKENS
        kept = send(torch_url, **force, skip_special_tokens=False).json()
        assert text(kept["choices"][0]) == "<tool_call>" * MAX_TOKENS
    assert _complete(torch_url, skip_special_tokens="maybe").status_code == 400


def test_sampling_with_min_p_one_is_greedy(torch_url, baseline):
    out = _complete(torch_url, temperature=1.0, min_p=1.0, seed=3).json()["choices"][0]
    assert out["text"] == baseline["text"]


@pytest.mark.parametrize(("field", "value"), [
    ("use_beam_search", True), ("bad_words", ["apples"]), ("prompt_logprobs", 1), ("truncate_prompt_tokens", 4),
    ("best_of", 2), ("suffix", "!"), ("structured_outputs", {"regex": "a+"}),
    ("guided_json", {"type": "object"}), ("logprob_token_ids", [5]), ("return_token_ids", True),
])
def test_unimplemented_vllm_fields_are_refused_by_name(torch_url, field, value):
    for response in (_complete(torch_url, **{field: value}), _chat(torch_url, **{field: value})):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("echo", True), ("add_generation_prompt", False), ("continue_final_message", True), ("parallel_tool_calls", False),
])
def test_unimplemented_chat_fields_are_refused_by_name(torch_url, field, value):
    response = _chat(torch_url, **{field: value})
    assert response.status_code == 400 and response.json()["error"]["param"] == field


@pytest.mark.parametrize(("fields", "param"), [
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 20, "max_tokens": 10}, None), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"allowed_token_ids": [10**9]}, "allowed_token_ids"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
])
def test_bad_values_are_400s_naming_the_field(torch_url, fields, param):
    response = _complete(torch_url, **fields)
    assert response.status_code == 400, response.text
    if param is not None:
        assert response.json()["error"]["param"].split(".")[0] == param


def test_streamed_answers_equal_whole_ones_under_the_new_fields(torch_url, baseline):
    fields = {"frequency_penalty": 1.0, "stop": [baseline["text"][3:5] or "x"], "include_stop_str_in_output": True}
    whole = _complete(torch_url, **fields).json()["choices"][0]["text"]
    with httpx.stream("POST", torch_url + "/v1/completions", timeout=120,
                      json={"model": "assistant", "prompt": PROMPT, "temperature": 0, "max_tokens": MAX_TOKENS,
                            "stream": True, **fields}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events if json.loads(e)["choices"]) == whole


# -- vLLM's tokenizer routes ------------------------------------------------------------------
def test_detokenize_tokenizer_info_and_version(torch_url, rlhf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rlhf)
    ids = _ids(torch_url, "Mia has 5 apples.")
    assert _post(torch_url, "/detokenize", {"tokens": ids}).json() == {"prompt": "Mia has 5 apples."}
    assert _post(torch_url, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert _post(torch_url, "/detokenize", {"tokens": [-1]}).status_code == 400
    info = httpx.get(torch_url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["tokenizer_class"] and info["chat_template"] == tok.chat_template
    assert not any(key.endswith("_file") and info[key] for key in info)  # no paths
    assert httpx.get(torch_url + "/version").json()["version"]
    plain = _post(torch_url, "/tokenize", {"prompt": "<|im_end|>", "add_special_tokens": False,
                                           "return_token_strs": True}).json()
    assert plain["tokens"] == [tok.eos_token_id] and plain["token_strs"] == ["<|im_end|>"]


# -- the same request on --engine torch and --engine vllm -------------------------------------
Case = Callable[[dict[str, Any]], dict[str, Any]]

# Each case builds its fields from the plain greedy completion (its text and token ids).
SAME: dict[str, Case] = {
    "presence_penalty": lambda b: {"presence_penalty": 1.5},
    "frequency_penalty": lambda b: {"frequency_penalty": 1.0},
    "repetition_penalty": lambda b: {"repetition_penalty": 1.3},
    "repetition_penalty_below_1": lambda b: {"repetition_penalty": 0.8},
    "logit_bias": lambda b: {"logit_bias": {str(b["ids"][1]): -100, str(b["ids"][0] + 1): 2.5}},
    "min_p": lambda b: {"min_p": 0.5},
    "min_tokens": lambda b: {"min_tokens": MAX_TOKENS, "stop_token_ids": [b["ids"][2]]},
    "stop_token_ids": lambda b: {"stop_token_ids": [b["ids"][2]]},
    "include_stop_str_in_output": lambda b: {"stop": [b["text"][4:6] or "x"], "include_stop_str_in_output": True},
    "stop_token_included": lambda b: {"stop_token_ids": [b["ids"][2]], "include_stop_str_in_output": True},
    "allowed_token_ids": lambda b: {"allowed_token_ids": sorted(set(b["ids"][:4]))},
    "special_tokens_skipped": lambda b: {"logit_bias": {str(b["marker"]): 100}},
    "special_tokens_kept": lambda b: {"logit_bias": {str(b["marker"]): 100}, "skip_special_tokens": False},
    "ignore_eos": lambda b: {"ignore_eos": True},
    "seed_top_k_top_p_greedy": lambda b: {"seed": 7, "top_k": 5, "top_p": 0.5},
    "all_neutral": lambda b: {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_p": 0,
                              "min_tokens": 0, "use_beam_search": False, "length_penalty": 1.0},
}
REFUSED: dict[str, dict[str, Any]] = {
    "use_beam_search": {"use_beam_search": True},
    "bad_words": {"bad_words": ["apples"]},
    "truncate_prompt_tokens": {"truncate_prompt_tokens": 8},
    "prompt_logprobs": {"prompt_logprobs": 1},
}


@pytest.fixture(scope="module")
def vllm_url(rlhf: Path) -> Iterator[str]:
    """``assist serve --engine vllm``: our endpoint in front of one managed vLLM child."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from assist.engine._vllm import VLLMClient, VLLMServer

    server = VLLMServer(rlhf, served_model_name="assistant").start()
    backend = UpstreamBackend(VLLMClient(server), context_length=server.max_model_len, owned=server)
    with running_server(create_app(backend)) as url:
        yield url


def _answer(response: httpx.Response) -> tuple[str, str, int]:
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return text, choice["finish_reason"], body["usage"]["completion_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("case", sorted(SAME) + sorted(REFUSED))
def test_the_same_request_on_torch_and_vllm(torch_url, vllm_url, baseline, case, route):
    send = _complete if route == "completions" else _chat
    fields = SAME[case](baseline) if case in SAME else REFUSED[case]
    torch_response = send(torch_url, **fields)
    if case in REFUSED:
        assert torch_response.status_code == 400, torch_response.text
        assert torch_response.json()["error"]["param"] == case
        return
    assert _answer(send(vllm_url, **fields)) == _answer(torch_response), fields


@pytest.mark.slow
def test_vllm_tokenizer_routes_agree(torch_url, vllm_url):
    ids = _ids(torch_url, PROMPT)
    assert _ids(vllm_url, PROMPT) == ids
    assert _post(vllm_url, "/detokenize", {"tokens": ids}).json() == _post(torch_url, "/detokenize",
                                                                            {"tokens": ids}).json()
    theirs, ours = (httpx.get(u + "/tokenizer_info").json() for u in (vllm_url, torch_url))
    for key in ("eos_token", "bos_token", "pad_token"):
        assert theirs.get(key) == ours.get(key), key

