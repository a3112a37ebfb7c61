"""``voxtui data audit``: every defect kind, with its line number; odd files handled, input untouched."""

import json

import pytest

from conftest import digest, voxtui, write_jsonl
from engine.data.audit import audit

GOOD = {"instruction": "What is asthma?", "input": "", "output": "Chronic airway inflammation."}
KO = {"instruction": "천식이란 무엇인가요?", "output": "기도에 만성 염증이 생기는 질환입니다."}


def kinds(report):
    return [(d["line"], d["kind"]) for d in report["defects"]]


def test_every_defect_kind(tmp_path):
    rows = [
        GOOD,                                                       # 1
        b'{"instruction": "broken", ',                              # 2 invalid_json
        [1, 2, 3],                                                  # 3 not_object
        b'{"instruction": "caf\xe9", "output": "x"}',               # 4 bad_encoding (latin-1)
        {"instruction": "no output"},                               # 5 missing_field
        {"instruction": "n", "output": 42},                         # 6 wrong_type
        {"instruction": "   ", "output": "x"},                      # 7 empty_field
        {"instruction": "bell\x07", "output": "ok"},                # 8 control_chars
        {"instruction": "What  is asthma?", "output": "Chronic airway inflammation. "},  # 9 duplicate of 1
        KO,                                                         # 10
        {"instruction": "x " * 400, "output": "long"},              # 11 too_long
        {"instruction": "What is gout?", "output": "Uric acid."},   # 12 leak
    ]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    other = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "What is gout?", "output": "Something else."}])
    before = digest(f)
    report = audit(str(f), against=str(other), max_len=64)
    assert kinds(report) == [(2, "invalid_json"), (3, "not_object"), (4, "bad_encoding"), (5, "missing_field"),
                             (6, "wrong_type"), (7, "empty_field"), (8, "control_chars"), (9, "duplicate"),
                             (11, "too_long"), (12, "leak")]
    dup = report["defects"][7]
    assert dup["detail"] == "same as line 1"
    assert "val.jsonl:1" in report["defects"][-1]["detail"]
    assert report["rows"] == 12 and report["valid"] == 2
    assert report["counts"] == {k: 1 for _, k in kinds(report)}
    assert digest(f) == before


def test_wrong_type_details_read_as_english(tmp_path):
    """The article fits the type: "an array", "an object", "a number"; null takes none."""
    rows = [{"instruction": "q", "output": ["a"]}, {"instruction": {"k": 1}, "output": "x"},
            {"instruction": "q", "output": 42}, {"messages": [None]}, {"messages": {"role": "user"}}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    details = [d["detail"] for d in audit(str(f))["defects"]]
    assert details == ["output is an array, not a string", "instruction is an object, not a string",
                       "output is a number, not a string", "messages[0] is null, not an object",
                       "messages is an object, not a list"]
    proc = voxtui("data", "audit", f)
    assert "is an array" in proc.stdout + proc.stderr and "is a array" not in proc.stdout + proc.stderr


def test_bom_crlf_blank_lines_are_not_defects(tmp_path):
    raw = b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\r\n   \r\n" + json.dumps(KO, ensure_ascii=False).encode() + b"\r\n"
    f = write_jsonl(tmp_path / "d.jsonl", [], raw=raw)
    report = audit(str(f))
    assert report["rows"] == 2 and report["valid"] == 2 and report["defects"] == []
    bad = write_jsonl(tmp_path / "e.jsonl", [], raw=raw + b"{oops\r\n")
    assert kinds(audit(str(bad))) == [(5, "invalid_json")]  # line numbers count the blank lines


def test_empty_file(tmp_path):
    f = write_jsonl(tmp_path / "empty.jsonl", [], raw=b"")
    assert audit(str(f)) == {"file": str(f), "rows": 0, "valid": 0, "counts": {"no_rows": 1},
                             "defects": [{"line": 0, "kind": "no_rows", "detail": "the file is empty"}]}
    blank = write_jsonl(tmp_path / "blank.jsonl", [], raw=b"\r\n  \n\t\n")
    assert audit(str(blank))["defects"] == [{"line": 0, "kind": "no_rows", "detail": "the file holds only blank lines"}]


def test_strict_fails_an_empty_file(tmp_path):
    """An empty file (or one of blank lines) is a defect: no rows. --strict exits 1 and says why."""
    for name, raw in (("empty.jsonl", b""), ("blank.jsonl", b"\n\n   \n")):
        f = write_jsonl(tmp_path / name, [], raw=raw)
        proc = voxtui("data", "audit", f, "--strict")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "no_rows" in proc.stdout and "file" in proc.stdout and "Traceback" not in proc.stderr
        assert voxtui("data", "audit", f).returncode == 0  # without --strict: the audit ran
        assert f.read_bytes() == raw
    proc = voxtui("data", "audit", tmp_path / "empty.jsonl", "--strict", "--json", "-")
    assert proc.returncode == 1 and json.loads(proc.stdout)["counts"] == {"no_rows": 1}


@pytest.mark.slow
def test_huge_line(tmp_path):
    big = {"instruction": "summarise", "output": "가나다 " * (50 * 1024 * 1024 // 10)}  # ~50 MB of UTF-8
    f = write_jsonl(tmp_path / "big.jsonl", [GOOD, big, b"{", KO])
    report = audit(str(f))
    assert report["rows"] == 4 and kinds(report) == [(3, "invalid_json")]


def test_cli_exit_codes_and_json(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    out = tmp_path / "report.json"
    proc = voxtui("data", "audit", f, "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"file", "rows", "valid", "defects", "counts"}
    assert report["defects"] == [{"line": 2, "kind": "duplicate", "detail": "same as line 1"}]
    assert voxtui("data", "audit", f, "--strict").returncode == 1
    clean = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    assert voxtui("data", "audit", clean, "--strict").returncode == 0
    missing = voxtui("data", "audit", tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "no such file" in missing.stderr
    assert voxtui("data", "audit", f, "--max-len", "-3").returncode == 2
    stdout_json = voxtui("data", "audit", f, "--json", "-")
    assert json.loads(stdout_json.stdout)["rows"] == 2  # --json - keeps stdout pure JSON
    before = digest(f)
    over = voxtui("data", "audit", f, "--json", f)
    assert over.returncode == 2 and "would overwrite the input" in over.stderr and digest(f) == before


def test_parallel_scan_matches_inline(tmp_path, monkeypatch):
    import engine.data.scan as scan

    rows = []
    for i in range(3000):
        rows.append({"instruction": f"Question {i % 1000}?", "input": "맥락" * (i % 7), "output": f"Answer {i}."})
        if i % 500 == 0:
            rows.append(b"{bad json")
    f = write_jsonl(tmp_path / "many.jsonl", rows)
    inline = audit(str(f), max_len=20, workers=1)
    monkeypatch.setattr(scan, "INLINE_BELOW", 0)
    monkeypatch.setattr(scan, "CHUNK_LINES", 256)
    parallel = audit(str(f), max_len=20, workers=2)
    assert parallel == inline
    assert inline["counts"]["invalid_json"] == 6 and inline["counts"]["too_long"] > 0
