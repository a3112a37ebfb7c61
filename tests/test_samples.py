"""The bundled sample data and the demo command."""

import json

from conftest import voxtui
from engine.data.audit import audit
from engine.samples import TRAIN, VAL


def test_sample_data_is_clean_bilingual_and_leak_free():
    rows = [json.loads(line) for line in TRAIN.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 400
    langs = {r["lang"] for r in rows}
    assert langs == {"en", "ko"}
    assert any("\uac00" <= ch <= "\ud7a3" for ch in rows[-1]["output"] + rows[-2]["output"])
    val = audit(str(VAL), against=str(TRAIN))
    assert val["rows"] >= 40 and val["defects"] == []
    assert audit(str(TRAIN))["defects"] == []


def test_demo_runs(tmp_path):
    proc = voxtui("demo", "--runs", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "_models" / "tiny" / "config.json").is_file()
    assert "432 rows" in proc.stdout and "exceed" in proc.stdout
