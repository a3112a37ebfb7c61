"""Generated bad input for the data tools and ``score``: no traceback, exit 0/1/2, the input unchanged.

Files are made by hypothesis from random bytes, random JSON values per line, rows whose fields have the
wrong types, non-UTF-8, control characters, a BOM, CRLF endings and blank lines. Each file goes through
``engine.cli.main`` in this process (the tokenizer is loaded once), then a few nasty files, a huge line
among them, go through the real command line in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import digest, voxtui, write_jsonl
from engine.cli import main
from engine.rows import FATAL_KINDS, parse_line

# --------------------------------------------------------------------------------------- strategies

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "   ", "\x07bell", "e\u0301", "\u2028", "천식이란?", "\x00", "a\r\nb", "\ufeff", "\U0001f600"])
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=8)
fields = texts | json_values
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["system", "user", "assistant", "tool"]) | fields,
                                              "content": fields})
rows = st.fixed_dictionaries({}, optional={"instruction": fields, "input": fields, "output": fields,
                                           "prediction": fields, "messages": st.lists(message, max_size=4) | fields})
good_rows = st.builds(lambda i, o, p: {"instruction": i, "output": o, "prediction": p},
                      texts.filter(str.strip), texts.filter(str.strip), texts)
NASTY = [
    b"", b"   ", b"\t", b"{", b"}", b"[" * 3000 + b"]" * 3000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b"NaN", b"Infinity", b"1e999", b"9" * 5000, b'{"instruction": "x", "output": 1e999}',
    b'{"instruction": "a\\ud800", "output": "b"}', b'{"instruction": "q", "output": "\\u0000"}',
    b"\xff\xfe{\x00", b'{"instruction": "caf\xe9", "output": "x"}', b"\xef\xbb\xbf{}", b"\x00" * 10,
    b'{"instruction": "q", "instruction": 5, "output": "a"}', b'{"messages": null}', b'"just a string"',
    b'{"prediction": "p", "output": "o"}', b'{"messages": [{"role": "user", "content": "\\u0007"}, '
                                           b'{"role": "assistant", "content": "ok"}]}',
]


def _line(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


lines = st.one_of(st.binary(max_size=60), json_values.map(_line), rows.map(_line), good_rows.map(_line),
                  st.sampled_from(NASTY))


@st.composite
def files(draw) -> bytes:
    body = draw(st.lists(lines, max_size=14))
    sep = draw(st.sampled_from([b"\n", b"\r\n"]))
    raw = sep.join(body) + (sep if body and draw(st.booleans()) else b"")
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + raw


# ------------------------------------------------------------------------------------------- helpers


def run(argv: list[str]) -> tuple[int, str, str]:
    """``voxtui ARGV`` in this process: (exit status, stdout, stderr). Any exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def nonblank_lines(raw: bytes) -> list[int]:
    """1-based numbers of the lines holding something other than white space (an independent count)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    parts = raw.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return [i for i, p in enumerate(parts, 1) if p.strip()]


def one_line_error(err: str) -> bool:
    return err.startswith("voxtui: error: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- tests


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=files(), val_frac=st.sampled_from([0.0, 0.1, 0.5, 0.9]), seed=st.integers(0, 3))
def test_generated_files_never_crash_a_tool(raw, val_frac, seed):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        f = d / "in.jsonl"
        f.write_bytes(raw)
        before = digest(f)
        present = nonblank_lines(raw)

        rc, _, err = run(["data", "audit", f, "--strict", "--workers", "1", "--json", d / "audit.json"])
        assert rc in (0, 1) and err == "", err
        audit = json.loads((d / "audit.json").read_text())
        assert audit["rows"] == len(present) and (rc == 1) == bool(audit["defects"])
        assert (audit["rows"] == 0) == ("no_rows" in audit["counts"])
        assert {x["line"] for x in audit["defects"]} <= set(present) | {0}
        broken = {x["line"] for x in audit["defects"] if x["kind"] in FATAL_KINDS}

        rc, out, err = run(["data", "analyze", f, "--workers", "1", "--max-len", "16", "--json", d / "analyze.json"])
        assert rc == 0 and err == "" and out.startswith(f"{f}: ")
        analyze = json.loads((d / "analyze.json").read_text())
        assert analyze["rows"] == len(present) and analyze["invalid"] == len(broken)

        rc, _, err = run(["data", "find-long", f, "--workers", "1", "--max-len", "16", "--out", d / "long.jsonl"])
        assert rc == 0 and err == ""
        long_rows = [json.loads(x) for x in (d / "long.jsonl").read_bytes().split(b"\n") if x]
        assert [r["line"] for r in long_rows] == analyze["over_max_len_lines"]

        rc, _, err = run(["data", "split", f, "--train", d / "t.jsonl", "--val", d / "v.jsonl",
                          "--val-frac", str(val_frac), "--seed", str(seed), "--report", d / "split.json"])
        if rc == 2:
            assert one_line_error(err) and "nothing written" in err, err
            assert not any((d / n).exists() for n in ("t.jsonl", "v.jsonl", "split.json"))
            assert "no usable row" in err or "every usable row would go to val" in err
        else:
            report = json.loads((d / "split.json").read_text())
            # a --val-frac above 0 that leaves val no row is warned on stderr, in one line; nothing else is said
            val_warning = val_frac > 0 and report["val"] == 0
            assert rc == 0 and (err.startswith("voxtui: warning: --val-frac ") and err.count("\n") == 1
                                if val_warning else err == ""), err
            written = [[x for x in (d / n).read_bytes().split(b"\n") if x] for n in ("t.jsonl", "v.jsonl")]
            assert len(written[0]) == report["train"] > 0 and len(written[1]) == report["val"]
            assert report["kept"] + len(report["dropped"]) == len(present)
            assert {x["line"] for x in report["dropped"] if x["reason"] in FATAL_KINDS} >= broken
            for line in written[0] + written[1]:  # every written row is a usable, clean one
                ex, defects = parse_line(line)
                assert ex is not None and defects == [], (line, defects)

        rc, out, err = run(["score", f, "--json", d / "score.json"])
        if rc == 2:
            assert one_line_error(err) and not (d / "score.json").exists(), err
        else:
            assert rc == 0
            score = json.loads((d / "score.json").read_text())
            assert score["rows"] + len(score["bad_rows"]) == len(present) and score["rows"] > 0
            assert [x["line"] for x in score["bad_rows"]] == sorted(x["line"] for x in score["bad_rows"])
            shown = [x for x in err.split("\n") if re.match(rf"{re.escape(str(f))}:\d+: ", x)]
            assert len(shown) == min(len(score["bad_rows"]), 20)

        assert digest(f) == before


VAL_NO_ROW = ("voxtui: warning: --val-frac 0.1 of 2 usable rows gives val no row: {} is empty, and a run given it "
              "as --val_jsonl has no evaluation, early stopping or best checkpoint (a larger --val-frac, or more rows)\n")


def test_nasty_files_through_the_command_line(tmp_path):
    """A huge line, non-UTF-8, deep nesting, BOM and CRLF: every tool answers 0/1/2, never a traceback."""
    huge = {"instruction": "summarise", "output": "가나다 라마 " * 200_000}  # ~3 MB
    body = [b"\xef\xbb\xbf" + _line({"instruction": "q", "output": "a", "prediction": "a"}), _line(huge),
            b"x" * 2_000_000, *NASTY]
    f = write_jsonl(tmp_path / "nasty.jsonl", [], raw=b"\r\n".join(body) + b"\r\n")
    before = digest(f)
    # in this process (the tokenizer is loaded once): every tool, with --max-len
    for cmd in (["data", "audit", f, "--max-len", "64", "--workers", "1"], ["data", "analyze", f, "--max-len", "64"],
                ["data", "split", f, "--train", tmp_path / "t.jsonl", "--val", tmp_path / "v.jsonl", "--max-len", "64"]):
        rc, _, err = run(cmd)
        assert rc == 0 and err in ("", VAL_NO_ROW.format(tmp_path / "v.jsonl")), (cmd, err)
    assert json.loads((tmp_path / "t.jsonl").read_bytes().split(b"\n")[1])["output"].startswith("가나다 라마")
    # and through the real command line
    commands = [["data", "audit", f, "--strict"], ["data", "find-long", f, "--max-len", "64", "--out", tmp_path / "long.jsonl"],
                ["data", "split", f, "--train", tmp_path / "t.jsonl", "--val", tmp_path / "v.jsonl"],
                ["score", f, "--json", tmp_path / "score.json"]]
    for cmd in commands:
        proc = voxtui(*cmd)
        assert proc.returncode in (0, 1), (cmd, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (cmd, proc.stderr[-2000:])
    assert digest(f) == before
    long_rows = [json.loads(x) for x in (tmp_path / "long.jsonl").read_bytes().split(b"\n") if x]
    assert [r["line"] for r in long_rows] == [2] and long_rows[0]["row"] == huge
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["rows"] == 2 and {b["line"] for b in score["bad_rows"]} >= {2, 3, 7, 8, 9, 10}
    for name, raw in (("bin.jsonl", bytes(range(256)) * 50), ("one.jsonl", b"\xff")):
        g = write_jsonl(tmp_path / name, [], raw=raw)
        for cmd in (["data", "audit", g], ["data", "split", g, "--train", tmp_path / "a", "--val", tmp_path / "b"],
                    ["score", g]):
            proc = voxtui(*cmd)
            assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, (cmd, proc.stderr)
        assert g.read_bytes() == raw
