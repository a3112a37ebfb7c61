"""Synthetic medical-QA-like rows with a log-normal length distribution (for GPU benchmarks).

Sentences come from the bundled sample data (Korean and English); each row's answer is drawn until it
reaches a log-normal token target (median ``median`` tokens, capped at ``cap``).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.samples import TRAIN  # noqa: E402


def write_rows(path: str | Path, n: int, median: int = 380, cap: int = 1024, seed: int = 0) -> None:
    import math

    rng = random.Random(seed)
    by_lang: dict[str, list[dict]] = {"en": [], "ko": []}
    for line in TRAIN.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        by_lang[r["lang"]].append(r)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            pool = by_lang["ko" if i % 2 else "en"]
            target = min(cap, max(24, int(rng.lognormvariate(math.log(median), 0.55))))
            q = rng.choice(pool)
            parts, approx = [], 20
            while approx < target:
                s = rng.choice(pool)["output"]
                parts.append(s)
                approx += len(s) // (2 if i % 2 else 4)  # rough chars per token
            f.write(json.dumps({"instruction": q["instruction"], "input": q["input"],
                                "output": " ".join(parts)}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_rows(sys.argv[1], int(sys.argv[2]), *(int(x) for x in sys.argv[3:]))
