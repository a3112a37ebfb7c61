"""What the worker writes beside the run when another process removes its folders while the run goes: the
TensorBoard folder (a removed tb/ failed the run at its next step) and the spool (events appended to removed
files were lost with the worker: "nothing trained is lost" held only for what the folder kept)."""

import shutil

import pytest

from engine.eventlog import Spool, read_spool
from engine.protocol import Step


def step(n: int) -> Step:
    return Step(step=n, loss=1.0 / n, lr=1e-4, grad_norm=0.5, tokens_per_s=100.0, step_time=0.1)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # (its writer thread's traceback)
def test_a_removed_tensorboard_folder_costs_a_record_not_the_run(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.worker.report import Board

    tb = tmp_path / "tb"
    board = Board(tb)
    board.step(step(1))
    board.flush()
    shutil.rmtree(tb)
    for n in range(2, 6):  # TensorBoard's writer opens its file at each flush: the removal shows there
        board.step(step(n))
        board.flush()
    board.eval(0.5, 5)
    board.close()
    err = capsys.readouterr().err
    assert "TensorBoard:" in err and "Traceback" not in err  # its writer thread's error: said once, in one line
    acc = EventAccumulator(str(tb))
    acc.Reload()
    loss = [e.step for e in acc.Scalars("train/loss")]
    assert loss and loss[-1] == 5 and [e.step for e in acc.Scalars("eval/loss")] == [5]


def test_a_removed_spool_folder_is_made_again_and_keeps_what_follows(tmp_path):
    folder = tmp_path / "spool"
    spool = Spool(folder, "w1")
    spool.write(1, b'{"a": 1}')
    shutil.rmtree(folder)
    for wseq in (2, 3):
        spool.write(wseq, b'{"a": %d}' % wseq)
    spool.close()
    files = read_spool(folder)["w1"]
    assert [first for first, _ in files] == [2]
    assert files[0][1].read_bytes().splitlines() == [b'{"a": 2}', b'{"a": 3}']
