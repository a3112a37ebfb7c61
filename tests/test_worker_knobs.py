"""The worker's patience with a silent engine (--engine_timeout, and VOXTUI_ENGINE_TIMEOUT over it), and
the test and benchmark knobs read in one place (engine/worker/knobs.py)."""

import time

import pytest

from conftest import engine_sockets, train_args, worker, write_jsonl
from engine.protocol import event_decoder
from engine.util import UsageError
from engine.worker.knobs import Knobs, read


def test_knobs_are_read_from_the_environment_and_checked():
    assert read({}) == Knobs()
    assert read({"VOXTUI_FAULT_NAN_STEP": "3", "VOXTUI_FAULT_SLOW_SAVE": "2.5", "VOXTUI_ENGINE_TIMEOUT": "4",
                 "VOXTUI_DDP_SPLIT_GRAPHS": "1"}) == Knobs(nan_step=3, slow_save=2.5, engine_timeout=4.0,
                                                            ddp_split_graphs=True)
    assert read({"VOXTUI_DDP_SPLIT_GRAPHS": "yes", "VOXTUI_FAULT_NAN_STEP": ""}) == Knobs()  # "1" only; empty: unset
    assert read({"VOXTUI_PROFILE_STEPS": "4:6"}).profile_steps == (4, 6)
    assert read({"VOXTUI_PROFILE_STEPS": "5"}).profile_steps == (5, 5)
    assert read({"VOXTUI_EAGER_CE": "1", "VOXTUI_NF4_BNB_FORWARD": "1", "VOXTUI_FUSION": "all"}) == Knobs(
        eager_ce=True, nf4_bnb_forward=True, fusion="all")
    assert Knobs().fusion == "none" and read({"VOXTUI_INDUCTOR": "autotune"}).inductor == "autotune"
    assert Knobs().step_overlap and not read({"VOXTUI_STEP_OVERLAP": "0"}).step_overlap
    assert not Knobs().cuda_graphs and read({"VOXTUI_CUDA_GRAPHS": "1"}).cuda_graphs
    assert not Knobs().nf4_keep_weights and read({"VOXTUI_NF4_KEEP_WEIGHTS": "1"}).nf4_keep_weights
    assert Knobs().step_pause == 0 and read({"VOXTUI_STEP_PAUSE": "0.25"}).step_pause == 0.25
    for env, says in [({"VOXTUI_FAULT_NAN_STEP": "three"}, "VOXTUI_FAULT_NAN_STEP=three: not a whole number"),
                      ({"VOXTUI_FAULT_SLOW_SAVE": "-1"}, "VOXTUI_FAULT_SLOW_SAVE=-1: must be 0 or more"),
                      ({"VOXTUI_ENGINE_TIMEOUT": "0"}, "VOXTUI_ENGINE_TIMEOUT=0: must be above 0"),
                      ({"VOXTUI_ENGINE_TIMEOUT": "nan"}, "VOXTUI_ENGINE_TIMEOUT=nan: must be 0 or more"),
                      ({"VOXTUI_PROFILE_STEPS": "a:b"}, "VOXTUI_PROFILE_STEPS=a:b: not A:B"),
                      ({"VOXTUI_STEP_PAUSE": "inf"}, r"VOXTUI_STEP_PAUSE=inf: at most 60 \(seconds\)"),
                      ({"VOXTUI_STEP_PAUSE": "-0.1"}, "VOXTUI_STEP_PAUSE=-0.1: must be 0 or more"),
                      ({"VOXTUI_FUSION": "some"}, "VOXTUI_FUSION=some: must be one of none, nf4, all"),
                      ({"VOXTUI_INDUCTOR": "max"}, "VOXTUI_INDUCTOR=max: must be one of default, coordinate, autotune"),
                      ({"VOXTUI_CHECKPOINT": "outside"}, "VOXTUI_CHECKPOINT=outside: must be one of inside, around"),
                      ({"VOXTUI_STEP_OVERLAP": "no"}, "VOXTUI_STEP_OVERLAP=no: must be one of 0, 1"),
                      ({"VOXTUI_CUDA_GRAPHS": "yes"}, "VOXTUI_CUDA_GRAPHS=yes: must be one of 0, 1"),
                      ({"VOXTUI_NF4_KEEP_WEIGHTS": "y"}, "VOXTUI_NF4_KEEP_WEIGHTS=y: must be one of 0, 1"),
                      ({"VOXTUI_PROFILE_STEPS": "5:2"}, r"VOXTUI_PROFILE_STEPS=5:2: needs 1 <= A <= B"),
                      ({"VOXTUI_PROFILE_STEPS": "0:2"}, r"VOXTUI_PROFILE_STEPS=0:2: needs 1 <= A <= B")]:
        with pytest.raises(UsageError, match=says):
            read(env)


def test_profiled_steps_write_the_kernel_table(tmp_path, tiny_model):
    """VOXTUI_PROFILE_STEPS=A:B: a real run writes profile.txt, time summed by kind, then the operators
    (on the CPU: the CPU operators, since there are no kernels), and trains to its end as usual."""
    rows = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(20)])
    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, rows, max_steps=4), env={"VOXTUI_PROFILE_STEPS": "2:3"})
    assert proc.returncode == 0, proc.stdout
    text = (out / "profile.txt").read_text()
    assert text.startswith("time per step (CPU operators), 2 steps profiled: ")
    assert "matmul" in text and "aten::" in text
    # the host's phases: each of the 2 profiled steps once each, the forward and backward inside them
    phases = text[text.index("host time per step by phase"):].split("\n\n")[1].splitlines()[1:]
    calls = {line.split()[2]: int(line.split()[1]) for line in phases}
    assert {k: calls.get(k) for k in ("batch", "to_device", "forward", "backward", "clip", "control", "gather",
                                      "optimizer", "report", "boundary")} == dict.fromkeys(
        ("batch", "to_device", "forward", "backward", "clip", "control", "gather", "optimizer", "report",
         "boundary"), 1), text
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    from engine.worker.profiling import phase

    with phase("x") as p:  # not profiling: nothing is recorded
        assert p is None


def test_kernel_kinds():
    from engine.worker.profiling import kind

    assert kind("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>") == "attention"
    assert kind("nvjet_hsh_256x128_64x4_2x1_v_bz_coopB_TNN") == "matmul"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert kind("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled (triton)"
    assert kind("aten::mm") == "matmul"
    assert kind("something_else") == "other"


def test_engine_timeout_is_a_checked_config_field(tmp_path):
    from engine.config import read_toml, resolve, to_toml
    from engine.train import build_parser

    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "output": "b"}])
    cfg = resolve(build_parser().parse_args(["--train_jsonl", str(train), "--engine_timeout", "7.5"]))
    assert cfg.engine_timeout == 7.5
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert read_toml(tmp_path / "c.toml")["engine_timeout"] == 7.5  # what a resume reads back
    with pytest.raises(UsageError, match=r"--engine_timeout must be above 0 \(got 0.0\)"):
        resolve(build_parser().parse_args(["--train_jsonl", str(train), "--engine_timeout", "0"]))


@pytest.mark.parametrize("flag,env", [("2", {}), ("600", {"VOXTUI_ENGINE_TIMEOUT": "2"})])
def test_a_silent_engine_stops_the_worker_after_its_timeout(tmp_path, tiny_model, flag, env):
    """No heartbeat for --engine_timeout seconds (or VOXTUI_ENGINE_TIMEOUT's, which wins and is not saved
    in config.toml): the worker saves, stops and says the engine went away."""
    pull, pub = engine_sockets(tmp_path)
    rows = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(40)])
    out = tmp_path / "run"
    proc = worker(train_args(tiny_model, out, rows, max_steps=100000, engine=tmp_path / "engine.json",
                             engine_timeout=flag), env=env, wait=False)
    seen = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            while pull.poll(200):
                seen.append(event_decoder.decode(pull.recv()))
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
        while pull.poll(500):
            seen.append(event_decoder.decode(pull.recv()))
    finally:
        if proc.poll() is None:
            proc.kill()
        pull.close()
        pub.close()
    last = seen[-1]
    assert last.type == "status" and last.state == "finished" and last.outcome == "engine_lost", seen[-3:]
    assert any(e.type == "checkpoint" for e in seen)
    assert f"engine_timeout = {float(flag)!r}" in (out / "config.toml").read_text()


def test_gpu_idle_gaps_are_charged_to_the_host_operation_under_way():
    """idle_report over a timeline (µs): kernels 0–100, 100–150, 400–500, 520–600; host ops: a step
    0–600 and inside it a sync 160–390. The 250 µs gap goes to the sync, the 20 µs one is under 50 µs."""
    from types import SimpleNamespace as NS

    from engine.worker.profiling import idle_report

    def ev(kind, a, b, name="k"):
        return NS(device_type=NS(name=kind), time_range=NS(start=a, end=b), name=name)

    class Prof:
        def events(self):
            return [ev("CUDA", 0, 100), ev("CUDA", 100, 150), ev("CUDA", 400, 500), ev("CUDA", 520, 600),
                    ev("CPU", 0, 600, "step"), ev("CPU", 160, 390, "cudaStreamSynchronize")]

    text = idle_report(Prof(), 1, 0.0006)
    assert "GPU busy 0.33 ms; idle in gaps of >= 50 µs 0.25 ms (1 gaps a step)" in text, text
    assert text.splitlines()[-1].split() == ["0.25", "1", "cudaStreamSynchronize"]


def test_phase_ranges_on_the_gpu_timeline_are_not_kernels():
    """A phase's range, drawn on the GPU's timeline by the profiler (a user annotation spanning the kernels
    launched within it, gaps included), is neither kernel time nor busy time: a profile of a GPU run counted
    ``voxtui.forward`` as a third of the kernels' time and hid the GPU's idle gaps inside the forward."""
    from types import SimpleNamespace as NS

    from engine.worker.profiling import idle_report, report

    cuda, cpu = NS(name="CUDA"), NS(name="CPU")

    def ev(name, a, b, dev=cuda, note=False):
        return NS(key=name, name=name, device_type=dev, is_user_annotation=note, time_range=NS(start=a, end=b),
                  self_device_time_total=b - a, count=1)

    events = [ev("nvjet_sm90_gemm", 0, 400), ev("flash_fwd_kernel", 600, 1000),
              ev("voxtui.forward", 0, 1000, note=True), ev("gpu_user_annotation_x", 0, 1000, note=True),
              ev("voxtui.forward", 0, 1000, dev=cpu), ev("aten::mm", 400, 600, dev=cpu)]
    prof = NS(key_averages=lambda: events, events=lambda: events)
    table = report(prof, 1)
    assert table.startswith("time per step (GPU kernels), 1 steps profiled: 0.80 ms")
    assert "voxtui.forward" not in table and "annotation" not in table
    idle = idle_report(prof, 1, 1000.0)
    assert "GPU busy 0.80 ms" in idle and "idle in gaps of >= 50 µs 0.20 ms (1 gaps a step)" in idle, idle
    assert "aten::mm" in idle
