"""Small subcommands that need no module of their own."""

from __future__ import annotations

from pathlib import Path


def model_tiny(args) -> int:
    from engine.tiny import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed, force=args.force)
    print(out)
    return 0


def demo(args) -> int:
    """For now: the tiny model and the data tools on the bundled sample data."""
    from engine.data import analyze, audit, find_long
    from engine.samples import TRAIN, VAL
    from engine.tiny import write_tiny_model

    model = Path(args.runs) / "_models" / "tiny"
    if not (model / "config.json").exists():
        write_tiny_model(model, force=True)
    print(f"tiny model: {model}")
    print(f"sample data: {TRAIN} ({VAL.name} beside it)\n")
    print(analyze.render(analyze.analyze(str(TRAIN), str(model), max_len=128)), end="\n\n")
    print(audit.render(audit.audit(str(TRAIN), against=str(VAL), max_len=128, model=str(model))), end="\n\n")
    print(find_long.render(find_long.find_long(str(TRAIN), 96, str(model))))
    return 0
