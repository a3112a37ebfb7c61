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


def test_demo_starts_a_real_run(tmp_path):
    import json
    import time

    from engine.client import EngineClient, engine_alive
    from engine.protocol import Stop

    proc = voxtui("demo", "--runs", tmp_path / "runs", "--no-attach", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "_models" / "tiny" / "config.json").is_file()
    assert "432 rows" in proc.stdout
    run = tmp_path / proc.stdout.strip().splitlines()[-1]
    assert run.name.startswith("demo-")
    info = json.loads((run / "engine.json").read_text())
    assert engine_alive(info) and info["nproc"] == 2
    with EngineClient(run) as c:
        deadline = time.time() + 120
        for ev in c.events(timeout=120):
            if ev.type == "step" or time.time() > deadline:
                break
        assert ev.type == "step"
        assert c.send(Stop()).status == "ok"
