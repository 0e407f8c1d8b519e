"""In-context preference scoring (ICDPO: align without fine-tuning).

ICDPO (Song et al., 2024, "ICDPO: Effectively Borrowing Alignment Capability of Others via
In-context Direct Preference Optimization") scores a candidate response y to a prompt x by how much
k preference demonstrations in the context raise its likelihood:

    s(y) = log p(y | demos, x) − log p(y | x)      ("expert" with the demos, "amateur" without)

the same model playing both parts, like DPO's implicit reward with the in-context model as the
policy and the bare model as the reference. Candidates are reranked by s, best first.

- Demonstrations are (prompt, chosen response) pairs from a preference file, retrieved by BM25 over
  the prompts (`BM25`, Robertson & Zaragoza's Okapi formula, k1 = 1.5, b = 0.75, words = lower-cased
  `\\w+` runs); one demonstration per distinct prompt, the query's own prompt excluded.
- Contexts are chat conversations rendered with the tokenizer's chat template (`Renderer` of the
  training loop): expert = [user q1, assistant a1, ..., user qk, assistant ak, user x], amateur =
  [user x]. The candidate's tokens are rendered once and scored, alone, after either context
  (-100 labels on the context); the most relevant demonstration sits next to the query.
- Sequence log-probs come from `fastpref.integrations.transformers.sequence_logps` (hidden states
  × head, no logits held), in length-sorted batches of `batch_size` sequences with a tqdm bar.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from fastpref.integrations.transformers import sequence_logps
from fastpref.train.data import PACKAGED, Example, Renderer, collate, packaged_path


class Demonstration(NamedTuple):
    prompt: str
    response: str


class Query(NamedTuple):
    """One prompt, its N candidate responses, and the demonstrations for its expert context."""

    prompt: str
    candidates: list[str]
    demonstrations: list[Demonstration]


class CandidateScores(NamedTuple):
    """Per candidate (N,): expert and amateur summed log-probs, their difference `score` (ICDPO's s),
    the candidate's token count; `ranking` lists candidate indices by score, best first;
    `demonstrations_used`: how many demonstrations the expert context held (fewer than given when
    `max_length` made room for the longest candidate)."""

    expert: torch.Tensor
    amateur: torch.Tensor
    score: torch.Tensor
    lengths: torch.Tensor
    ranking: list[int]
    demonstrations_used: int

    @property
    def best(self) -> int:
        return self.ranking[0]


# --- demonstrations ---


def read_pairs(source: str) -> list[dict]:
    """Preference rows {prompt, chosen, rejected} (strings) from a JSONL file or a packaged name ('hhh')."""
    path = packaged_path(source) if source in PACKAGED else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"demonstrations {source!r}: not a JSONL file nor one of {sorted(PACKAGED)}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not all(isinstance(row.get(c), str) for c in ("prompt", "chosen")):
            raise ValueError(f"demonstrations {source}: row {i} needs string `prompt` and `chosen` fields")
    return rows


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over a list of documents: scores(query) -> one float per document."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.docs = [Counter(words(d)) for d in documents]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg_length = sum(self.lengths) / max(len(self.docs), 1) or 1.0
        frequency = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in frequency.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> list[float]:
        terms = [w for w in set(words(query)) if w in self.idf]
        out = []
        for doc, length in zip(self.docs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / self.avg_length)
            out.append(sum(self.idf[w] * doc[w] * (self.k1 + 1) / (doc[w] + norm) for w in terms if w in doc))
        return out


class DemonstrationPool:
    """Retrieval of k (prompt, chosen) demonstrations for a query, one per distinct prompt."""

    def __init__(self, pairs: list[dict]):
        first_pair = {}
        for row in pairs:
            first_pair.setdefault(row["prompt"].strip(), row)
        self.demonstrations = [Demonstration(r["prompt"], r["chosen"]) for r in first_pair.values()]
        self.bm25 = BM25([d.prompt for d in self.demonstrations])

    def retrieve(self, prompt: str, k: int) -> list[Demonstration]:
        """The k most similar demonstrations, least similar first (the best one next to the query);
        any demonstration of `prompt` itself is left out."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:  # k = 0: expert == amateur, every score 0
            raise ValueError(f"k must be an int >= 1 (ICDPO scores against k demonstrations), got {k!r}")
        scores = self.bm25.scores(prompt)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        own = prompt.strip()
        candidates = [self.demonstrations[i] for i in order if self.demonstrations[i].prompt.strip() != own]
        if k > len(candidates):
            raise ValueError(f"k = {k} but the pool holds {len(candidates)} demonstration(s) of other prompts: "
                             f"choose k <= {len(candidates)}")
        return candidates[:k][::-1]


# --- contexts ---


def _conversation(prompt: str, demonstrations: list[Demonstration]) -> list[dict]:
    messages = []
    for demo_prompt, demo_response in demonstrations:
        messages += [{"role": "user", "content": demo_prompt}, {"role": "assistant", "content": demo_response}]
    return messages + [{"role": "user", "content": prompt}]


class Sequences(NamedTuple):
    """Token ids of one query: the expert and amateur contexts, each candidate's, and the demonstrations the
    expert context holds."""

    expert: list[int]
    amateur: list[int]
    candidates: list[list[int]]
    demonstrations: list[Demonstration]


def build_sequences(renderer: Renderer, query: Query, max_length: int | None = None) -> Sequences:
    """The contexts end with the generation prompt; candidates are rendered after the amateur context and
    reused verbatim. With `max_length`, the least similar demonstrations are dropped until the longest
    candidate fits (every candidate shares one expert context, so that their scores compare); a candidate
    that does not fit even after the bare prompt is a ValueError."""
    amateur, candidates = renderer.encode(_conversation(query.prompt, []), list(query.candidates))
    longest = max(range(len(candidates)), key=lambda i: len(candidates[i]))
    if max_length is not None and len(amateur) + len(candidates[longest]) > max_length:
        raise ValueError(
            f"candidate {longest} ({len(candidates[longest])} tokens) does not fit max_length {max_length} even "
            f"after the bare prompt ({len(amateur)} tokens): raise max_length"
        )
    demos = list(query.demonstrations)
    while True:
        expert, _ = renderer.encode(_conversation(query.prompt, demos), [])
        if not demos or max_length is None or len(expert) + len(candidates[longest]) <= max_length:
            return Sequences(expert, amateur, candidates, demos)
        demos = demos[1:]


# --- scoring ---


def _check_query(query: Query) -> None:
    if not isinstance(query.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(query.prompt).__name__}")
    if not query.candidates or not all(isinstance(c, str) and c.strip() for c in query.candidates):
        raise ValueError("candidates must be a non-empty list of non-empty strings")
    if not all(isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(x, str) for x in d)
               for d in query.demonstrations):
        raise ValueError("demonstrations must be (prompt, response) pairs of strings")


@torch.no_grad()
def _sequence_logps(model, tokenizer, sequences, batch_size: int, progress: bool) -> torch.Tensor:
    """(S,) summed log-probs of each (context ids, candidate ids), batched by length."""
    from tqdm.auto import tqdm

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    out = torch.empty(len(sequences), dtype=torch.float32)
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch_ids in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        examples = [Example(i, sequences[i][0], [sequences[i][1]]) for i in batch_ids]
        batch = collate(examples, tokenizer.pad_token_id)
        logps = sequence_logps(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device)
        )
        out[batch_ids] = logps.float().cpu()
    return out


def score_queries(model, tokenizer, queries: list[Query], *, batch_size=8, max_length=None, progress=True):
    """ICDPO scores for many queries at once (one progress bar): -> [CandidateScores] per query."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token)")
    renderer = Renderer(tokenizer)
    sequences, spans = [], []
    for query in queries:
        _check_query(query)
        expert, amateur, candidates, kept = build_sequences(renderer, query, max_length)
        start = len(sequences)
        sequences += [(expert, c) for c in candidates] + [(amateur, c) for c in candidates]
        spans.append((start, len(candidates), torch.tensor([len(c) for c in candidates]), len(kept)))
    was_training = model.training
    model.eval()
    try:
        logps = _sequence_logps(model, tokenizer, sequences, batch_size, progress)
    finally:
        model.train(was_training)
    results = []
    for start, n, lengths, used in spans:
        expert, amateur = logps[start : start + n], logps[start + n : start + 2 * n]
        score = expert - amateur
        ranking = sorted(range(n), key=lambda i: -score[i].item())
        results.append(CandidateScores(expert, amateur, score, lengths, ranking, used))
    return results


def score(model, tokenizer, prompt, candidates, demonstrations, *, batch_size=8, max_length=None, progress=True):
    """ICDPO scores of N candidate responses to `prompt`: s = log p(y | demos, x) − log p(y | x).

    demonstrations: (prompt, response) pairs for the expert context (e.g. `DemonstrationPool.retrieve`),
    least relevant first. Returns CandidateScores (expert, amateur, score, lengths: (N,); ranking; best;
    demonstrations_used).
    """
    query = Query(prompt, list(candidates), list(demonstrations))
    return score_queries(model, tokenizer, [query], batch_size=batch_size, max_length=max_length, progress=progress)[0]


def rerank(candidates: list[str], scores: CandidateScores) -> list[str]:
    """The candidates, best first."""
    return [candidates[i] for i in scores.ranking]


__all__ = [
    "BM25",
    "CandidateScores",
    "Demonstration",
    "DemonstrationPool",
    "Query",
    "Sequences",
    "build_sequences",
    "read_pairs",
    "rerank",
    "score",
    "score_queries",
]
