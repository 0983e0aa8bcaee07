"""Loaders for wiki-18 style corpora and FlashRAG style questions, on fixtures written here."""
import json

import pytest

import sdar_envs
from sdar_envs.searchqa import build_suite, load_corpus_jsonl, load_questions_jsonl

CORPUS = [
    {"id": "0", "contents": '"Paris"\nParis is the capital and largest city of France.'},
    {"id": "1", "contents": '"Berlin"\nBerlin is the capital of Germany.'},
    {"id": "2", "contents": '"Danube"\nThe Danube flows through Vienna and Budapest.'},
    {"id": "3", "contents": '"Mount Everest"\nMount Everest is the highest mountain on Earth.'},
]
QUESTIONS = [
    {"id": "q0", "question": "what is the capital of france", "golden_answers": ["Paris"],
     "data_source": "nq"},
    {"id": "q1", "question": "Which river flows through Vienna?", "golden_answers": ["Danube", "the Danube"],
     "data_source": "hotpotqa"},
    {"id": "q2", "question": "What is the highest mountain?", "golden_answers": ["Mount Everest"],
     "data_source": "triviaqa"},
]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def files(tmp_path):
    return (_write(tmp_path / "wiki.jsonl", CORPUS), _write(tmp_path / "train.jsonl", QUESTIONS),
            _write(tmp_path / "test.jsonl", QUESTIONS[:1]))


def test_load_corpus_and_questions(files):
    corpus, train, _ = files
    docs = load_corpus_jsonl(corpus)
    assert len(docs) == 4 and docs[1]["contents"].startswith('"Berlin"\n')
    assert len(load_corpus_jsonl(corpus, limit=2)) == 2
    qs = load_questions_jsonl(train)
    assert qs[0].question == "what is the capital of france?"  # "?" appended as in Search-R1
    assert [q.task_type for q in qs] == ["single_hop", "multi_hop", "single_hop"]
    assert qs[1].golden_answers == ("Danube", "the Danube") and qs[1].data_source == "hotpotqa"


def test_loaded_suite_runs_end_to_end(files):
    corpus, train, test = files
    env = sdar_envs.make("searchqa", split="train", seed=0, corpus_path=str(corpus),
                         questions_path=str(train), test_questions_path=str(test))
    assert len(env.task_ids) == 3
    env.reset(task_ids=["searchqa/train/multi_hop/0"])
    obs, r, d, infos = env.step(env.expert_actions())
    assert '(Title: "Danube")' in obs[0] and not d[0]
    obs, r, d, infos = env.step(env.expert_actions())
    assert d == [True] and r == [1.0] and infos[0]["data_source"] == "hotpotqa"


@pytest.mark.parametrize("row, match", [
    ({"id": "x"}, "'question'"),
    ({"question": "q", "golden_answers": []}, "'golden_answers'"),
    ({"question": "q", "golden_answers": ["a"], "task_type": "trivia"}, "task_type='trivia'"),
])
def test_bad_question_rows(tmp_path, row, match):
    with pytest.raises(ValueError, match=match):
        load_questions_jsonl(_write(tmp_path / "q.jsonl", [row]))


def test_bad_corpus_and_options(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_corpus_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="'contents'"):
        load_corpus_jsonl(_write(tmp_path / "c.jsonl", [{"id": "1", "text": "x"}]))
    with pytest.raises(ValueError, match="corpus_path and questions_path go together"):
        build_suite(corpus_path=str(tmp_path / "c.jsonl"))
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        build_suite(test_fraction=1.5)


def test_loaded_index_is_cached_on_disk(files, tmp_path, monkeypatch, caplog):
    corpus, train, test = files
    monkeypatch.setenv("SDAR_CACHE", str(tmp_path / "cache"))
    first = build_suite(corpus_path=corpus, questions_path=train, test_questions_path=test)
    cached = list((tmp_path / "cache" / "searchqa").glob("bm25-*/params.index.json"))
    assert len(cached) == 1
    with caplog.at_level("INFO", logger="sdar_envs.searchqa"):
        second = build_suite(corpus_path=corpus, questions_path=train, test_questions_path=test)
    assert "loaded bm25s index" in caplog.text
    for q in ("capital of France", "Vienna river", "highest mountain"):
        assert first.retriever.search(q) == second.retriever.search(q)
