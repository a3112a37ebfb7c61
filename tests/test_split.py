"""``voxtui data split``: cleaning, dedupe, determinism, no leakage, a full report."""

import json

from conftest import digest, voxtui, write_jsonl
from engine.data.audit import audit
from engine.data.split import split


def make_rows(n=300):
    rows = []
    for i in range(n):
        lang = "ko" if i % 2 else "en"
        q = f"질문 {i // 3}번은 무엇인가요?" if lang == "ko" else f"What is question {i // 3}?"
        rows.append({"instruction": q, "input": "", "output": f"answer {i}", "lang": lang})  # 3 answers a prompt
    rows.insert(10, {"instruction": "What is question 1?", "input": "", "output": "answer 4"})  # duplicate
    rows.insert(20, b"{broken")
    rows.insert(30, {"instruction": "  Cafe\u0301\x07 ", "output": " ok "})  # cleaned: NFC + control char
    rows.insert(40, {"instruction": "\x01", "output": "x"})  # empty after cleaning
    return rows


def test_split_is_deterministic_and_leak_free(tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", make_rows())
    before = digest(f)
    a = split(str(f), str(tmp_path / "t1.jsonl"), str(tmp_path / "v1.jsonl"), val_frac=0.2, seed=7)
    b = split(str(f), str(tmp_path / "t2.jsonl"), str(tmp_path / "v2.jsonl"), val_frac=0.2, seed=7)
    assert (tmp_path / "t1.jsonl").read_bytes() == (tmp_path / "t2.jsonl").read_bytes()
    assert (tmp_path / "v1.jsonl").read_bytes() == (tmp_path / "v2.jsonl").read_bytes()
    assert a == {**b, "file": a["file"]}
    c = split(str(f), str(tmp_path / "t3.jsonl"), str(tmp_path / "v3.jsonl"), val_frac=0.2, seed=8)
    assert (tmp_path / "v3.jsonl").read_bytes() != (tmp_path / "v1.jsonl").read_bytes()
    assert digest(f) == before
    assert a["train"] + a["val"] == a["kept"] == 301 and abs(a["val"] - 60) <= 2 and c["val"] > 0
    reasons = {(d["line"], d["reason"]) for d in a["dropped"]}
    assert reasons == {(11, "duplicate"), (21, "invalid_json"), (41, "empty_field")}
    assert a["cleaned"] >= 1
    val_audit = audit(str(tmp_path / "v1.jsonl"), against=str(tmp_path / "t1.jsonl"))
    assert val_audit["defects"] == []  # no duplicate, no leak, no control characters
    train_text = (tmp_path / "t1.jsonl").read_text() + (tmp_path / "v1.jsonl").read_text()
    assert "Café" in train_text and "\\u0007" not in train_text


def test_split_max_len(tmp_path, fmt):
    long_row = {"instruction": "Explain", "output": "word " * 200}
    f = write_jsonl(tmp_path / "d.jsonl", [long_row, {"instruction": "x " * 100, "output": "y"}, {"instruction": "q", "output": "a"}])
    r = split(str(f), str(tmp_path / "t.jsonl"), str(tmp_path / "v.jsonl"), val_frac=0.0, max_len=50)
    assert r["truncated"] == 1 and [d["reason"] for d in r["dropped"]] == ["too_long"]
    from engine.data.analyze import analyze

    assert analyze(str(tmp_path / "t.jsonl"))["length"]["total"]["max"] <= 50
    r = split(str(f), str(tmp_path / "t.jsonl"), str(tmp_path / "v.jsonl"), val_frac=0.0, max_len=50, long="drop")
    assert r["kept"] == 1 and len(r["dropped"]) == 2


def test_split_cli(tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", make_rows(60))
    rep = tmp_path / "rep.json"
    proc = voxtui("data", "split", f, "--train", tmp_path / "t.jsonl", "--val", tmp_path / "v.jsonl", "--report", rep)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(rep.read_text())["kept"] == 61
    same = voxtui("data", "split", f, "--train", f, "--val", tmp_path / "v.jsonl")
    assert same.returncode == 2 and "overwrite the input" in same.stderr
    assert voxtui("data", "split", f, "--train", tmp_path / "a", "--val", tmp_path / "b", "--val-frac", "1.5").returncode == 2


def test_split_without_usable_rows_writes_nothing(tmp_path):
    """No usable row (empty file, blank lines, every row broken), or none left for train: exit 2 with one
    line, no output created or overwritten, input untouched."""
    cases = {
        "empty.jsonl": b"",
        "blank.jsonl": b"\n  \r\n\n",
        "broken.jsonl": b'{"instruction": "q"}\n[1, 2]\n{oops\n\xff\xfe\n',
        "one-prompt.jsonl": b'{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "b"}\n',
    }
    for name, raw in cases.items():
        f = write_jsonl(tmp_path / name, [], raw=raw)
        train, val, rep = tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path / "r.json"
        train.write_text("old train\n")  # an earlier split's output stays as it was
        args = ["data", "split", f, "--train", train, "--val", val, "--report", rep]
        proc = voxtui(*args, *(["--val-frac", "0.5"] if name == "one-prompt.jsonl" else []))
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "nothing written" in proc.stderr and "Traceback" not in proc.stderr
        assert train.read_text() == "old train\n" and not val.exists() and not rep.exists()
        assert f.read_bytes() == raw
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    broken = voxtui("data", "split", tmp_path / "broken.jsonl", "--train", tmp_path / "a", "--val", tmp_path / "b")
    assert "4 row(s) dropped" in broken.stderr and "line 1 missing_field" in broken.stderr


def test_split_report_may_not_overwrite(tmp_path):
    f = write_jsonl(tmp_path / "all.jsonl", make_rows(30))
    before = digest(f)
    for rep in (f, tmp_path / "t.jsonl"):
        proc = voxtui("data", "split", f, "--train", tmp_path / "t.jsonl", "--val", tmp_path / "v.jsonl", "--report", rep)
        assert proc.returncode == 2 and "would overwrite" in proc.stderr
    assert digest(f) == before and not (tmp_path / "t.jsonl").exists()


def test_a_val_frac_that_gives_val_no_row_is_warned(tmp_path):
    """--val-frac above 0 that leaves val empty (40 rows × 0.001) is said on stderr: a run given that file
    has no evaluation; the split itself goes on (exit 0, val written empty). One row is "1 row"."""
    f = write_jsonl(tmp_path / "good.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)])
    proc = voxtui("data", "split", f, "--train", tmp_path / "s1.jsonl", "--val", tmp_path / "s2.jsonl",
                  "--val-frac", "0.001")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s2.jsonl").read_bytes() == b"" and len((tmp_path / "s1.jsonl").read_text().splitlines()) == 40
    warning, = proc.stderr.splitlines()
    assert warning.startswith("voxtui: warning: --val-frac 0.001 of 40 usable rows gives val no row: ")
    assert f"{tmp_path / 's2.jsonl'} is empty" in warning and "no evaluation, early stopping" in warning

    one = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "q", "output": "a"}])
    proc = voxtui("data", "split", one, "--train", tmp_path / "o1.jsonl", "--val", tmp_path / "o2.jsonl")
    assert proc.returncode == 0 and proc.stdout.startswith(f"{one}: 1 row → train 1, val 0;")
    assert "of 1 usable row gives val no row" in proc.stderr
    proc = voxtui("data", "split", f, "--train", tmp_path / "n1.jsonl", "--val", tmp_path / "n2.jsonl",
                  "--val-frac", "0")
    assert proc.returncode == 0 and proc.stderr == ""  # asked for no val: nothing to warn about
