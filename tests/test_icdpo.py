"""fastpref.icdpo: BM25 retrieval, the expert / amateur contexts, and the contrastive scores and
ranking on a tiny Llama with the word-level test tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

import transformers
from test_train import model_dir, pair_rows, tiny_config, tokenizer_dir, write_jsonl

from fastpref import icdpo
from fastpref.train.data import Renderer

PAIRS = pair_rows(6, 2)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    return model, transformers.AutoTokenizer.from_pretrained(tokenizer_dir())


def test_bm25_prefers_shared_rare_words():
    bm25 = icdpo.BM25(["the red sky", "the green grass", "the sea the sea"])
    scores = bm25.scores("what colour is the grass ?")
    assert scores.index(max(scores)) == 1
    assert bm25.scores("nothing in common") == [0.0, 0.0, 0.0]


def test_retrieve_excludes_the_query_prompt_and_keeps_one_demo_per_prompt():
    pool = icdpo.DemonstrationPool(PAIRS)
    assert len(pool.demonstrations) == 6  # 12 pairs, 6 prompts
    query = PAIRS[2]["prompt"]  # "what colour is the sky number 1 ?" shares words with every prompt
    demos = pool.retrieve(query, 3)
    assert len(demos) == 3 and query not in [d.prompt for d in demos]
    assert len({d.prompt for d in demos}) == 3
    assert all(d.response == next(r["chosen"] for r in PAIRS if r["prompt"] == d.prompt) for d in demos)
    assert len(pool.retrieve(query, 5)) == 5
    with pytest.raises(ValueError, match="k = 99 but the pool holds 5 demonstration"):
        pool.retrieve(query, 99)  # was: silently all 5
    for k in (0, -1):  # k = 0 scored every candidate 0
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            pool.retrieve(query, k)


def test_retrieve_orders_the_most_similar_next_to_the_query():
    pool = icdpo.DemonstrationPool([
        {"prompt": "sky colour", "chosen": "blue"},
        {"prompt": "grass", "chosen": "green"},
        {"prompt": "sea", "chosen": "blue too"},
    ])
    assert [d.prompt for d in pool.retrieve("what colour is the sky", 2)][-1] == "sky colour"


def test_contexts_hold_the_demos_and_the_candidate_alone_is_scored(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    demos = [icdpo.Demonstration("what colour is the sun number 3 ?", "the sun is green , i am glad to help .")]
    query = icdpo.Query("what colour is the sky number 1 ?", ["the sky is blue .", "go away ."], demos)
    expert, amateur, candidates, kept = icdpo.build_sequences(Renderer(tokenizer), query)
    assert kept == demos
    decode = tokenizer.decode
    assert "sun number 3" in decode(expert) and "the sun is green" in decode(expert)
    assert "sun" not in decode(amateur)
    assert expert[-len(amateur):] == amateur  # the demos come before the very same query turn
    assert [decode(c) for c in candidates] == ["the sky is blue . <eos>", "go away . <eos>"]
    # max_length drops demonstrations until the candidates fit
    short, _, _, kept = icdpo.build_sequences(Renderer(tokenizer), query, max_length=len(amateur) + 6)
    assert short == amateur and kept == []


def _textbook_logps(model, context, candidate):
    ids = torch.tensor([context + candidate])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(context) - 1 :].sum().item()  # the candidate's tokens only


def test_scores_are_expert_minus_amateur_and_rank_best_first(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    demos = icdpo.DemonstrationPool(PAIRS).retrieve(PAIRS[0]["prompt"], 2)
    candidates = [PAIRS[0]["chosen"], PAIRS[0]["rejected"], PAIRS[1]["rejected"]]
    scores = icdpo.score(model, tokenizer, PAIRS[0]["prompt"], candidates, demos, batch_size=2, progress=False)
    assert scores.expert.shape == scores.amateur.shape == scores.score.shape == scores.lengths.shape == (3,)
    query = icdpo.Query(PAIRS[0]["prompt"], candidates, demos)
    expert, amateur, ids, _ = icdpo.build_sequences(Renderer(tokenizer), query)
    assert scores.demonstrations_used == 2
    for i, candidate_ids in enumerate(ids):
        assert scores.expert[i].item() == pytest.approx(_textbook_logps(model, expert, candidate_ids), abs=1e-4)
        assert scores.amateur[i].item() == pytest.approx(_textbook_logps(model, amateur, candidate_ids), abs=1e-4)
        assert scores.lengths[i] == len(candidate_ids)
    torch.testing.assert_close(scores.score, scores.expert - scores.amateur)
    assert scores.ranking == sorted(range(3), key=lambda i: -scores.score[i].item())
    assert scores.best == scores.ranking[0]
    assert icdpo.rerank(candidates, scores)[0] == candidates[scores.best]
    one_by_one = icdpo.score(model, tokenizer, PAIRS[0]["prompt"], candidates, demos, batch_size=1, progress=False)
    torch.testing.assert_close(one_by_one.score, scores.score, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="candidates"):
        icdpo.score(model, tokenizer, "hi", [], [], progress=False)
    with pytest.raises(ValueError, match="demonstrations"):
        icdpo.score(model, tokenizer, "hi", ["hello"], ["not a pair"], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        icdpo.score(model, tokenizer, "hi", ["hello"], [], batch_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="demonstrations"):
        icdpo.read_pairs("no-such-file.jsonl")


def test_score_cli_ranks_the_candidates(tmp_path, capsys):
    from fastpref.cli import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code = main([
        "score", "--model", model_dir(), "--prompt", PAIRS[0]["prompt"], "--candidates", "go away .", "no .",
        "--demonstrations", str(pairs), "--k", "2", "--json",
    ])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["candidate"] for c in out["ranked"]] != [] and len(out["ranked"]) == 2
    assert out["ranked"][0]["score"] >= out["ranked"][1]["score"]
    assert len(out["demonstrations"]) == 2


def _long_candidate_case(tokenizer):
    """Two demonstrations; a candidate so long that only one of them fits beside it in max_length."""
    demos = icdpo.DemonstrationPool(PAIRS).retrieve(PAIRS[0]["prompt"], 2)
    candidates = ["go away .", " ".join(["the sky is blue ."] * 6)]
    renderer = Renderer(tokenizer)
    full = icdpo.build_sequences(renderer, icdpo.Query(PAIRS[0]["prompt"], candidates, demos))
    one = icdpo.build_sequences(renderer, icdpo.Query(PAIRS[0]["prompt"], candidates, demos[1:]))
    return demos, candidates, len(one.expert) + max(len(c) for c in one.candidates), full


def test_demonstrations_dropped_for_a_long_candidate_are_reported(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    demos, candidates, max_length, full = _long_candidate_case(tokenizer)
    assert len(full.expert) + max(len(c) for c in full.candidates) > max_length
    scores = icdpo.score(model, tokenizer, PAIRS[0]["prompt"], candidates, demos, max_length=max_length,
                         progress=False)
    assert scores.demonstrations_used == 1  # the least similar one went; every candidate shares that context
    with pytest.raises(ValueError, match=r"candidate 1 \(\d+ tokens\) does not fit max_length 12"):
        icdpo.score(model, tokenizer, PAIRS[0]["prompt"], candidates, demos, max_length=12, progress=False)


def test_score_cli_says_how_many_demonstrations_it_kept(tmp_path, capsys, model_and_tokenizer):
    from fastpref.cli import main

    _, tokenizer = model_and_tokenizer
    demos, candidates, max_length, _ = _long_candidate_case(tokenizer)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    argv = ["score", "--model", model_dir(), "--prompt", PAIRS[0]["prompt"], "--candidates", *candidates,
            "--demonstrations", str(pairs), "--k", "2", "--max_length", str(max_length)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "k = 1 demonstrations" in captured.out
    assert "1 of the 2 demonstrations dropped so that the longest candidate fits --max_length" in captured.err
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 1 and out["demonstrations"] == [demos[1].prompt] and out["demonstrations_dropped"] == 1


def test_score_cli_keeps_the_context_within_the_models_positions(tmp_path, capsys, model_and_tokenizer):
    """Without --max_length, the model's max_position_embeddings bounds the context (it used to grow to any length:
    ~12k tokens of demonstrations on a 1,024-position model)."""
    import shutil

    from fastpref.cli import main

    _, tokenizer = model_and_tokenizer
    _, candidates, positions, _ = _long_candidate_case(tokenizer)
    short = tmp_path / "short-model"
    shutil.copytree(model_dir(), short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["score", "--model", str(short), "--prompt", PAIRS[0]["prompt"], "--candidates", *candidates,
                 "--demonstrations", str(pairs), "--k", "2"]) == 0
    assert ("1 of the 2 demonstrations dropped so that the longest candidate fits the model's "
            f"max_position_embeddings {positions}") in capsys.readouterr().err
