"""Chaos on a real 2-rank CPU run (tests/chaos.py): faults in random order, then the record, the
states reported, the checkpoint and the processes are checked. `python tests/chaos.py --seeds …` runs more."""

import pytest
from chaos import Chaos


@pytest.mark.slow
def test_chaos_one_seed(tmp_path, tiny_model):
    # its five faults are over by step 80 to 140 (each after a step of the run resumed; the workers train on for
    # the seconds an engine kill takes to notice, more on a busy machine): 240 steps leave room for them, with 2
    # ranks training the rest to the end, the checkpoints every 5 steps included
    result = Chaos(tmp_path, tiny_model, seed=3, faults=5, max_steps=240).go()
    assert result["missing_steps"] == 0 and len(result["faults"]) >= 3
