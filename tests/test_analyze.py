"""``voxtui data analyze`` and ``find-long``: numbers equal a direct computation."""

import json

import numpy as np

from conftest import digest, voxtui, write_jsonl
from engine.data.analyze import analyze
from engine.data.find_long import find_long
from engine.rows import read_examples

ROWS = [
    {"instruction": "What is asthma?", "output": "Chronic inflammation of the airways."},
    {"instruction": "천식이란 무엇인가요?", "input": "6살 아들 때문에 여쭤봅니다.", "output": "기도에 만성 염증이 생기는 질환입니다. " * 5},
    {"instruction": "Explain gout", "input": "58, on diuretics", "output": "Uric acid crystals in a joint. " * 12},
    {"messages": [{"role": "user", "content": "고혈압?"}, {"role": "assistant", "content": "혈압이 높은 상태입니다."}]},
    b"not json",
]


def test_analyze_matches_direct_computation(tmp_path, fmt):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS)
    report = analyze(str(f), max_len=60)
    enc = fmt.encode([ex for _, ex in read_examples(write_jsonl(tmp_path / "ok.jsonl", ROWS[:4]))])
    total = np.array([len(p) + len(t) for p, t in enc])
    assert report["rows"] == 5 and report["usable"] == 4 and report["invalid"] == 1
    assert report["length"]["total"]["max"] == total.max() and report["length"]["total"]["min"] == total.min()
    assert report["length"]["total"]["p50"] == float(np.percentile(total, 50))
    assert report["length"]["prompt"]["mean"] == round(float(np.mean([len(p) for p, _ in enc])), 2)
    assert report["over_max_len"] == int((total > 60).sum()) > 0
    assert sum(b["count"] for b in report["histogram"]) == 4
    assert set(report["length"]["target"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max"}


def test_analyze_cli_json_and_model(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    before = digest(f)
    proc = voxtui("data", "analyze", f, "--model", tiny_model, "--max-len", "40", "--json", tmp_path / "a.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["rows"] == 4 and "total" in report["length"] and isinstance(report["over_max_len"], int)
    assert "p99" in proc.stdout and "█" in proc.stdout
    assert digest(f) == before
    bad = voxtui("data", "analyze", f, "--model", tmp_path / "no-such-model")
    assert bad.returncode == 2 and "error" in bad.stderr


def test_find_long(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ROWS)
    report = find_long(str(f), 60)
    lines = [r["line"] for r in report["long_rows"]]
    assert lines == analyze(str(f), max_len=60)["over_max_len_lines"]
    assert all(r["total_tokens"] > 60 and r["over_by"] == r["total_tokens"] - 60 for r in report["long_rows"])
    assert report["remedies"]["drop"]["rows_lost"] == len(lines)
    assert report["remedies"]["truncate"]["target_tokens_lost"] == sum(r["over_by"] for r in report["long_rows"])
    out = tmp_path / "long.jsonl"
    proc = voxtui("data", "find-long", f, "--max-len", "60", "--out", out)
    assert proc.returncode == 0, proc.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["line"] for w in written] == lines and written[0]["row"] == ROWS[lines[0] - 1]
    assert voxtui("data", "find-long", f).returncode == 2  # --max-len is required
