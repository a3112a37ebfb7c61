"""Chaos on a real 2-rank CPU run (tests/chaos.py): faults in random order, then the record, the
states reported, the checkpoint and the processes are checked. `python tests/chaos.py --seeds …` runs more."""

import pytest
from chaos import Chaos


@pytest.mark.slow
def test_chaos_one_seed(tmp_path, tiny_model):
    result = Chaos(tmp_path, tiny_model, seed=3, faults=5, max_steps=400).go()
    assert result["missing_steps"] == 0 and len(result["faults"]) >= 3
