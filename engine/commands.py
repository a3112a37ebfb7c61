"""Small subcommands that need no module of their own."""

from __future__ import annotations

from pathlib import Path


def model_tiny(args) -> int:
    from engine.tiny import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed, force=args.force)
    print(out)
    return 0


def demo(args) -> int:
    """The tiny model and the bundled sample data on the CPU: data check, a detached engine with two
    ranks, then the dashboard."""
    import time

    from engine.config import TrainConfig
    from engine.daemon.launch import start
    from engine.data import analyze, audit
    from engine.samples import TRAIN, VAL
    from engine.tiny import write_tiny_model

    model = Path(args.runs) / "_models" / "tiny"
    if not (model / "config.json").exists():
        write_tiny_model(model, force=True)
    print(f"tiny model: {model}")
    print(f"sample data: {TRAIN} ({VAL.name} beside it)\n")
    print(analyze.render(analyze.analyze(str(TRAIN), str(model), max_len=256)), end="\n\n")
    print(audit.render(audit.audit(str(VAL), against=str(TRAIN), max_len=256, model=str(model))), end="\n\n")
    cfg = TrainConfig(model_id=str(model), train_jsonl=str(TRAIN), val_jsonl=str(VAL), quant="none", bf16=False,
                      max_len=256, per_device_bsz=2, epochs=3, lr=1e-2, warmup_steps=10, eval_steps=40,
                      save_steps=40, preview_steps=20, preview_count=4, max_new_tokens=24, preview_budget=0.25,
                      nproc=args.nproc,
                      output_dir=str(Path(args.runs) / time.strftime("demo-%Y%m%d-%H%M%S")))
    cfg.validate()
    rc = start(cfg, detach=True)
    if rc or args.no_attach:
        return rc
    import subprocess
    import sys

    # the dashboard runs as `voxtui attach RUN`: the headless side never imports the TUI
    return subprocess.call([sys.executable, "-m", "engine", "attach", cfg.output_dir])
