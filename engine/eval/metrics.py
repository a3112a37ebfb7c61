"""Generation metrics that are right in Korean as well as English.

Tokenization (``tokenize``): rouge-score's stock tokenizer lowercases and deletes every character
outside ``[a-z0-9]``, so Korean text has no tokens and scores 0 whatever the prediction. Ours keeps
every script: ASCII runs of ``[a-z0-9]`` exactly as the stock tokenizer makes them (so ASCII text
scores exactly as stock rouge-score does), Hangul syllables and CJK characters one token each
(Korean words carry particles, so whole-word matching would under-count real overlap; syllables are
the usual unit for Korean ROUGE), and runs of other letters or digits (é, ü, Cyrillic…) as words.

* ROUGE-L: rouge-score's LCS F-measure with that tokenizer, averaged over rows. Two texts with no tokens
  at all (both empty, or only spaces and punctuation) have the same, empty, token sequence: 1.0, as exact
  match counts an empty prediction of an empty reference a match (rouge-score says 0.0 for it).
* BLEU: sacrebleu's corpus BLEU on text pre-tokenized the same way (``tokenize="none"``), so Korean is
  scored per syllable and English per word, consistently in one corpus (a corpus with no token on either
  side: 100, as for ROUGE-L; sacrebleu says 0).
* Distinct-1 / Distinct-2: unique n-grams over all n-grams of the predictions (corpus) and per row.
* Exact match after white-space folding; length ratio = prediction tokens / reference tokens (1.0 when
  both have none, as for ROUGE-L).
* Perplexity: exp of the token-weighted mean NLL of the references under a model (``perplexity``).
* Bootstrap 95% intervals for ROUGE-L, BLEU and exact match (rows resampled with a fixed seed).
  Distinct-n has none: resampling with replacement repeats rows, which lowers distinct-n by itself.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

_CJK = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7a3\ud7b0-\ud7ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[a-z0-9]+|[{_CJK}]|[^\W_a-z0-9{_CJK}]+")


def tokenize(text: str) -> list[str]:
    """Lowercase tokens of every script (see the module docstring)."""
    return _TOKEN.findall(text.lower())


class UnicodeTokenizer:
    """rouge-score's Tokenizer interface over :func:`tokenize`."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


_scorer = None


def has_tokens(text: str) -> bool:
    return _TOKEN.search(text.lower()) is not None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure; 1.0 for two texts without tokens (their token sequences are the same, empty one)."""
    global _scorer
    if not has_tokens(reference) and not has_tokens(prediction):
        return 1.0
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def ngrams(tokens: Sequence[str], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct(token_lists: list[list[str]], n: int) -> float:
    grams = [g for toks in token_lists for g in ngrams(toks, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    if not predictions:
        return 0.0
    if not any(map(has_tokens, predictions)) and not any(map(has_tokens, references)):
        return 100.0  # nothing on either side: the same (empty) corpus, as ROUGE-L and exact match say
    hyp = [" ".join(tokenize(p)) for p in predictions]
    ref = [" ".join(tokenize(r)) for r in references]
    return sacrebleu.corpus_bleu(hyp, [ref], tokenize="none").score


def fold(text: str) -> str:
    return " ".join(text.split())


def corpus(predictions: list[str], references: list[str]) -> dict:
    """The corpus metrics for aligned predictions and references."""
    pt = [tokenize(p) for p in predictions]
    rt = [tokenize(r) for r in references]
    n = len(predictions)
    return {
        "rows": n,
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n if n else 0.0,
        "bleu": bleu(predictions, references),
        "distinct_1": distinct(pt, 1),
        "distinct_2": distinct(pt, 2),
        "exact_match": sum(fold(p) == fold(r) for p, r in zip(predictions, references)) / n if n else 0.0,
        "length_ratio": length_ratio(sum(map(len, pt)), sum(map(len, rt))),
    }


def length_ratio(prediction_tokens: int, reference_tokens: int) -> float:
    """Prediction tokens over reference tokens; 1.0 when both are none (a reference without tokens and a
    prediction with some: the prediction's count)."""
    if not prediction_tokens and not reference_tokens:
        return 1.0
    return prediction_tokens / max(reference_tokens, 1)


def per_row(prediction: str, reference: str) -> dict:
    toks = tokenize(prediction)
    return {"rougeL": rouge_l(prediction, reference), "distinct_1": distinct([toks], 1),
            "distinct_2": distinct([toks], 2), "exact_match": fold(prediction) == fold(reference),
            "length_ratio": length_ratio(len(toks), len(tokenize(reference)))}


def bootstrap(predictions: list[str], references: list[str], samples: int = 200, seed: int = 0) -> dict:
    """95% percentile intervals of the corpus metrics over row resamples."""
    n = len(predictions)
    if n < 2:
        return {}
    rng = random.Random(seed)
    rows_rouge = [rouge_l(p, r) for p, r in zip(predictions, references)]
    em = [fold(p) == fold(r) for p, r in zip(predictions, references)]
    draws: dict[str, list[float]] = {k: [] for k in ("rougeL", "bleu", "exact_match")}
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        draws["rougeL"].append(sum(rows_rouge[i] for i in idx) / n)
        draws["bleu"].append(bleu([predictions[i] for i in idx], [references[i] for i in idx]))
        draws["exact_match"].append(sum(em[i] for i in idx) / n)
    out = {}
    for k, v in draws.items():
        v.sort()
        out[k] = [v[int(0.025 * (len(v) - 1))], v[int(math.ceil(0.975 * (len(v) - 1)))]]
    return out


def perplexity(model, fmt, examples, device, batch_size: int = 8) -> dict:
    """Teacher-forced perplexity of the references: exp(summed NLL of target tokens / their count)."""
    import torch

    from engine.worker.batching import Tokenized, collate
    from engine.worker.modeling import CausalLMLoss

    pairs = fmt.encode(examples)
    import numpy as np

    ids = [np.asarray(p + t, np.int32) for p, t in pairs]
    tok = Tokenized(ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
                    offsets=np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64),
                    prompt_lens=np.asarray([len(p) for p, _ in pairs], np.int32))
    loss_fn = CausalLMLoss(model)
    total, count = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        order = sorted(range(len(tok)), key=lambda i: -int(tok.lengths[i]))
        for i in range(0, len(order), batch_size):
            m = collate(tok, [[x] for x in order[i:i + batch_size]], fmt.pad, False)
            s, n = loss_fn(**{k: v.to(device) for k, v in m.items() if torch.is_tensor(v)})
            total += float(s)
            count += int(n)
    model.train(was)
    nll = total / max(count, 1)
    return {"perplexity": math.exp(min(nll, 50)), "nll": nll, "tokens": count}
