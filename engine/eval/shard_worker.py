"""One shard of ``voxtui infer --nproc N`` (engine/eval/shards.py starts N of them):
``python -m engine.eval.shard_worker SPEC.json`` generates the shard's rows into its file and sums its share
of the perplexity."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.util import write_json


def main(spec_path: str) -> int:
    """A shard: its rows generated into its file, its share of the perplexity summed."""
    import torch

    from engine.eval.infer import _generate, run_config
    from engine.eval.loading import MergedModel
    from engine.formatting import load_format
    from engine.rows import read_examples

    spec = json.loads(Path(spec_path).read_text())
    run_dir, dev = Path(spec["run_dir"]), torch.device(spec["device"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    cfg = run_config(run_dir)
    rows = list(read_examples(spec["data"]))
    fmt = load_format(cfg.model_id)
    model = MergedModel(cfg, dev).use(Path(spec["checkpoint"])).model
    mine = set(spec["rows"])
    done = {i: None for i in range(len(rows)) if i not in mine}
    Path(spec["out"]).unlink(missing_ok=True)
    _generate(model, fmt, rows, done, Path(spec["out"]), spec["params"], dev, "", lambda: None)
    if spec["ppl_rows"]:
        from engine.eval import metrics

        examples = [rows[i][1] for i in spec["ppl_rows"]]
        part = metrics.perplexity(model, fmt, examples, dev, spec["params"]["batch_size"])
        write_json(spec["ppl_out"], {"nll_sum": part["nll"] * part["tokens"], "tokens": part["tokens"]})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
