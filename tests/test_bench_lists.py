"""The GPU scripts name only configurations bench/throughput.py has (a misspelt one would be found on the GPU
machine, after minutes of its time)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_configuration_the_gpu_scripts_name_exists():
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput

    known = set(throughput.CONFIGS) | {"seed"}
    assert set(throughput.ENV) <= set(throughput.CONFIGS)
    named = []
    for script in ("gpu_issue15.sh", "gpu_throughput.sh"):
        text = (ROOT / "bench" / script).read_text()
        lists = re.findall(r"^\s+((?:[a-z0-9]+(?:-[a-z0-9]+)*,)+[a-z0-9]+(?:-[a-z0-9]+)*)\s*$", text, re.M)
        lists += re.findall(r"ONLY=\$\{2:-([a-z0-9,-]+)\}", text)
        named += [n for group in lists for n in group.split(",")]
    assert len(named) > 30
    assert sorted(set(named) - known) == []
