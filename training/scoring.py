"""Pure scoring functions for generation-scored eval tasks (no torch, no I/O).

Per-example functions follow their reference implementations: :func:`exact_match` and
:func:`token_f1` are the SQuAD v2 evaluation script's (0/1 and [0, 1]), :func:`chrf` is sacrebleu's
sentence chrF with its defaults (character n-grams up to 6, beta 2, whitespace removed, case kept,
effective-order averaging; [0, 100]). :func:`score_task` aggregates a task into points (0-100) so a
report never mixes scales; chrF is aggregated at corpus level (summed n-gram statistics), as
sacrebleu's ``corpus_score`` does, not as a mean of sentence scores.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "CHRF_BETA",
    "CHRF_ORDER",
    "TASK_METRICS",
    "accuracy",
    "chrf",
    "chrf_from_statistics",
    "chrf_statistics",
    "corpus_chrf",
    "example_score",
    "exact_match",
    "label_match",
    "normalize_answer",
    "normalize_label",
    "score_task",
    "token_f1",
]

CHRF_ORDER = 6
CHRF_BETA = 2.0

# Task name in a held-out record -> the metrics reported for it (in this order).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sentiment": ("accuracy",),
    "qa": ("exact_match", "token_f1"),
    "rewrite": ("chrf",),
}

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_SQUAD_PUNCT = frozenset(string.punctuation)


# ---------------------------------------------------------------- classification


def normalize_label(text: str) -> str:
    """Lowercase, drop punctuation (any Unicode P* character), collapse whitespace."""
    kept = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def label_match(prediction: str, label: str) -> bool:
    """The prediction's first words (as many as the label has) equal the label, after normalizing.

    "Positive. The review praises..." matches "positive"; "not positive" does not. An empty label
    matches only an empty prediction.
    """
    want = normalize_label(label).split()
    got = normalize_label(prediction).split()
    return got[: len(want)] == want if want else not got


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Share of :func:`label_match` hits in [0, 1]; 0.0 for no examples."""
    _same_length(predictions, labels)
    if not predictions:
        return 0.0
    return sum(label_match(p, y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


# ---------------------------------------------------------------- question answering


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, remove punctuation, then articles, then extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 of the normalized strings in [0, 1].

    When either side has no tokens (e.g. the reference was only an article), F1 is 1.0 if both are
    empty and 0.0 otherwise (SQuAD v2's rule for unanswerable questions).
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- chrF


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf_statistics(hypothesis: str, reference: str, order: int = CHRF_ORDER) -> list[int]:
    """[hyp n-grams, ref n-grams, matched n-grams] for n = 1..order, flattened (3 * order ints).

    Whitespace is removed first (sacrebleu's default ``whitespace=False``); matches are clipped
    counts (multiset intersection).
    """
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    stats: list[int] = []
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        stats += [sum(h.values()), sum(r.values()), sum((h & r).values())]
    return stats


def chrf_from_statistics(stats: Sequence[int], beta: float = CHRF_BETA) -> float:
    """chrF in [0, 100] from (summed) statistics.

    Precision and recall are averaged over the *effective* orders (those where both sides have
    n-grams), then combined: F = (1 + b^2) P R / (b^2 P + R). beta = 2 weighs recall twice as
    much as precision. No effective order (e.g. both strings empty) scores 0, as in sacrebleu.
    """
    if len(stats) % 3:
        raise ValueError(f"chrF statistics come in triples (got {len(stats)} numbers)")
    precision = recall = 0.0
    effective = 0
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i : i + 3]
        if n_hyp > 0 and n_ref > 0:
            precision += n_match / n_hyp
            recall += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    precision, recall = precision / effective, recall / effective
    if precision + recall == 0:
        return 0.0
    b2 = beta * beta
    return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


def chrf(
    hypothesis: str, reference: str, order: int = CHRF_ORDER, beta: float = CHRF_BETA
) -> float:
    """Sentence-level chrF in [0, 100]."""
    return chrf_from_statistics(chrf_statistics(hypothesis, reference, order), beta)


def corpus_chrf(
    hypotheses: Sequence[str],
    references: Sequence[str],
    order: int = CHRF_ORDER,
    beta: float = CHRF_BETA,
) -> float:
    """Corpus-level chrF in [0, 100]: statistics summed over all pairs, then one F-score."""
    _same_length(hypotheses, references)
    total = [0] * (3 * order)
    for h, r in zip(hypotheses, references, strict=True):
        total = [a + b for a, b in zip(total, chrf_statistics(h, r, order), strict=True)]
    return chrf_from_statistics(total, beta)


# ---------------------------------------------------------------- per task


def example_score(task: str, prediction: str, reference: str) -> dict[str, float]:
    """One example's scores (accuracy and exact match 0/1, token F1 in [0, 1], chrF in [0, 100])."""
    if task == "sentiment":
        return {"accuracy": float(label_match(prediction, reference))}
    if task == "qa":
        return {
            "exact_match": exact_match(prediction, reference),
            "token_f1": token_f1(prediction, reference),
        }
    if task == "rewrite":
        return {"chrf": chrf(prediction, reference)}
    raise ValueError(f"unknown task {task!r} (known: {', '.join(sorted(TASK_METRICS))})")


def score_task(
    task: str, predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float]:
    """A task's metrics in points (0-100), keys as in :data:`TASK_METRICS`."""
    _same_length(predictions, references)
    if task == "rewrite":
        return {"chrf": corpus_chrf(predictions, references)}
    if task not in TASK_METRICS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(sorted(TASK_METRICS))})")
    n = len(predictions)
    sums = dict.fromkeys(TASK_METRICS[task], 0.0)
    for p, r in zip(predictions, references, strict=True):
        for key, value in example_score(task, p, r).items():
            sums[key] += value
    return {key: 100.0 * s / n if n else 0.0 for key, s in sums.items()}


def _same_length(a: Sequence[str], b: Sequence[str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")
