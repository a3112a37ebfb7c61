"""Batch plans, packing and the loss: deterministic, sharded, and packing changes nothing but speed."""

import json

import numpy as np
import torch

from conftest import write_jsonl
from engine.batching import collate, plan_epoch, tokenize


def rows(n):
    return [{"instruction": f"Question {i}: " + "why " * (i % 9), "output": "because " * (1 + i % 13) + f"{i}."}
            for i in range(n)]


def test_plan_is_deterministic_sharded_and_grouped(tmp_path, fmt):
    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(103))), fmt, 512, "truncate", None)
    a = [plan_epoch(tok, 0, 7, 4, r, 2, 512, False, True) for r in range(2)]
    assert a == [plan_epoch(tok, 0, 7, 4, r, 2, 512, False, True) for r in range(2)]
    assert a != [plan_epoch(tok, 1, 7, 4, r, 2, 512, False, True) for r in range(2)]
    assert len(a[0]) == len(a[1]) == 103 // 8
    seen = [x for r in a for b in r for row in b for x in row]
    assert len(seen) == len(set(seen))  # no example on two ranks
    # grouped: the two ranks of one step get examples of similar length
    lengths = tok.lengths
    spread = [abs(max(lengths[[x[0] for x in a[0][s]]]) - max(lengths[[x[0] for x in a[1][s]]])) for s in range(len(a[0]))]
    assert np.median(spread) <= 3


def test_packing_plan_fits_and_covers(tmp_path, fmt):
    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(200))), fmt, 128, "truncate", None)
    plan = plan_epoch(tok, 0, 1, 2, 0, 1, 128, True, True)
    for batch in plan:
        for row in batch:
            assert sum(tok.lengths[x] for x in row) <= 128
    covered = sorted(x for b in plan for row in b for x in row)
    assert len(covered) == len(set(covered)) and len(covered) > 180


def test_packed_loss_equals_unpacked_loss(tmp_path, fmt, tiny_model):
    """The same examples packed into rows (block-diagonal mask, restarted positions) or padded give
    the same summed loss and token count."""
    from transformers import VoxtralForConditionalGeneration

    from engine.modeling import CausalLMLoss

    tok = tokenize(str(write_jsonl(tmp_path / "d.jsonl", rows(6))), fmt, 256, "truncate", None)
    model = VoxtralForConditionalGeneration.from_pretrained(tiny_model).eval()
    loss = CausalLMLoss(model, chunk=7)  # a small chunk exercises the chunked head
    unpacked = collate(tok, [[i] for i in range(6)], fmt.pad, packed=False)
    packed = collate(tok, [[0, 1, 2], [3, 4, 5]], fmt.pad, packed=True)
    assert packed["input_ids"].shape[0] == 2 and packed["attention_mask"].dim() == 4
    with torch.no_grad():
        a, na = loss(**{k: v for k, v in unpacked.items() if torch.is_tensor(v)})
        b, nb = loss(**{k: v for k, v in packed.items() if torch.is_tensor(v)})
        # and both equal the model's own loss computed example by example
        direct = 0.0
        for i in range(6):
            ids, p = tok.example(i)
            x = torch.tensor(ids, dtype=torch.long)[None]
            logits = model(input_ids=x).logits[0, :-1].float()
            direct += torch.nn.functional.cross_entropy(logits[p - 1:], x[0, p:], reduction="sum").item()
    assert int(na) == int(nb) == int(sum(len(tok.example(i)[0]) - tok.example(i)[1] for i in range(6)))
    assert torch.isclose(a, b, rtol=1e-5) and abs(float(a) - direct) / direct < 1e-5


def test_cache_hit_and_long_rows(tmp_path, fmt):
    data = write_jsonl(tmp_path / "d.jsonl", rows(20) + [{"instruction": "x " * 300, "output": "y"},
                                                         {"instruction": "q", "output": "long " * 300}])
    first = tokenize(str(data), fmt, 64, "truncate", str(tmp_path / "cache"))
    second = tokenize(str(data), fmt, 64, "truncate", str(tmp_path / "cache"))
    assert not first.cache_hit and second.cache_hit
    assert np.array_equal(first.ids, second.ids) and first.dropped == 1 and first.truncated >= 1
    assert first.lengths.max() <= 64
    dropped = tokenize(str(data), fmt, 64, "drop", str(tmp_path / "cache"))
    assert not dropped.cache_hit and dropped.truncated == 0 and len(dropped) < len(first)
    # labels cover the target (answer + EOS) only
    m = collate(first, [[0]], fmt.pad, packed=False)
    ids, p = first.example(0)
    assert (m["labels"][0, :p] == -100).all() and m["labels"][0, len(ids) - 1] == fmt.eos
    json.dumps({"ok": True})
