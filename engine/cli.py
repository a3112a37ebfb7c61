"""``voxtui``: the command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine import __version__
from engine.util import Parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a number of seconds") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text}: must be 0 or more seconds")
    return value


def _runs_folder(text: str) -> Path:
    """``--runs DIR`` given on the command line: an existing folder (the default, runs/, may be absent)."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, not a folder of runs")
    return p


def _data_parsers(sub) -> None:
    data = sub.add_parser("data", help="analyze, audit and find over-long rows in JSONL data; split it (cleaned and "
                                              "deduplicated) into train / val",
                          description="Data tools. Each reads its input without changing it and writes "
                                      "its outputs atomically.")
    dsub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    def common(p, model=True):
        p.add_argument("file", metavar="FILE", help="JSONL rows {instruction, input, output} or {messages}")
        if model:
            p.add_argument("--model", default=None, metavar="M",
                           help="model folder, tekken.json file or hub id whose tokenizer to use "
                                "(default: the Tekken tokenizer bundled with mistral-common)")
        p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="processes for parsing and tokenizing (default: CPU count)")

    p = dsub.add_parser("analyze", help="token-length statistics and a histogram")
    common(p)
    p.add_argument("--max-len", type=_positive_int, default=None, metavar="N", help="count rows over N tokens")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT (- for stdout)")
    p.set_defaults(handler="engine.data.analyze:main")

    p = dsub.add_parser("audit", help="every defect, with its 1-based line number")
    common(p)
    p.add_argument("--against", metavar="OTHER", help="flag rows that also stand in OTHER (leakage)")
    p.add_argument("--max-len", type=_positive_int, default=None, metavar="N", help="flag rows over N tokens")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT (- for stdout)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any defect is found")
    p.set_defaults(handler="engine.data.audit:main")

    p = dsub.add_parser("find-long", help="rows whose formatted example exceeds N tokens")
    common(p)
    p.add_argument("--max-len", type=_positive_int, required=True, metavar="N",
                   help="the longest formatted example allowed, in tokens (training's --max_len)")
    p.add_argument("--out", metavar="FILE", help="write the long rows (with counts) as JSONL")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT (- for stdout)")
    p.set_defaults(handler="engine.data.find_long:main")

    p = dsub.add_parser("split", help="clean, dedupe and split into train / val deterministically")
    p.add_argument("file", metavar="FILE", help="JSONL rows {instruction, input, output} or {messages}")
    p.add_argument("--train", required=True, metavar="OUT", help="where the training rows go (JSONL)")
    p.add_argument("--val", required=True, metavar="OUT", help="where the validation rows go (JSONL)")
    p.add_argument("--val-frac", type=float, default=0.1, metavar="F", help="share of rows for val (default 0.1)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="the shuffle's seed: the same file and seed give the same split (default 0)")
    p.add_argument("--max-len", type=_positive_int, default=None, metavar="N",
                   help="rows over N tokens are truncated or dropped (--long)")
    p.add_argument("--long", choices=("truncate", "drop"), default="truncate",
                   help="with --max-len: truncate the target (default) or drop the row")
    p.add_argument("--model", default=None, metavar="M", help="tokenizer for --max-len (as in analyze)")
    p.add_argument("--report", metavar="OUT", help="write the report (every dropped line and why) as JSON")
    p.set_defaults(handler="engine.data.split:main")


def _model_parsers(sub) -> None:
    """voxtui model tiny."""
    model = sub.add_parser("model", help="model helpers")
    msub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    p = msub.add_parser("tiny", help="write a small random-weight Voxtral with the real Tekken tokenizer")
    p.add_argument("out", metavar="OUT", help="folder to write (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (default 0)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it holds a tiny model this command wrote (a folder with anything else "
                        "in it is refused and left as it is)")
    p.set_defaults(handler="engine.commands:model_tiny")


def _run_parsers(sub) -> None:
    """voxtui preflight, run, engine list | status | stop | pause | resume | save | eval | preview | replay."""
    from engine.config import add_flags

    p = sub.add_parser("preflight", help="system, data, model and memory checks: go / warn / no-go and the launch command",
                       description="Collects every problem, then reports once with a verdict and the exact torchrun "
                                   "command. Exit 0 on go or warn, 1 on no-go, 2 on bad arguments.")
    add_flags(p, hidden=("engine",))  # voxtui run / preflight set the engine themselves
    p.add_argument("--json", metavar="OUT", help="write the report as JSON (- for stdout)")
    p.add_argument("--autorun", action="store_true", help="on go or warn, start the run (detached)")
    p.add_argument("--probe", action="store_true", help="run a few real steps to find the largest per-device batch "
                                                       "that fits; rescale --grad_accum to keep the effective batch")
    p.set_defaults(handler="engine.daemon.launch:cmd_preflight")

    p = sub.add_parser("run", help="start the engine for a new run (or --resume RUN)",
                       description="Creates runs/<run>/ (or --output_dir), writes the resolved config, runs "
                                   "preflight, then starts the engine, which spawns torchrun and relays its events.")
    add_flags(p, hidden=("engine",))  # voxtui run / preflight set the engine themselves
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its latest complete checkpoint")
    p.add_argument("--detach", action="store_true", help="run the engine in the background (survives the SSH "
                                                        "session); prints the run folder and returns")
    p.add_argument("--skip_preflight", action="store_true", help="start without the preflight checks")
    p.add_argument("--nnodes", type=int, default=1, metavar="N", help="machines in the run (torchrun's c10d "
                                                                     "rendezvous; this one is node 0)")
    p.add_argument("--rdzv_endpoint", default="", metavar="HOST:PORT", help="with --nnodes: the rendezvous address")
    p.add_argument("--listen", default="", metavar="tcp://HOST:PORT",
                   help="also accept clients from other machines on PORT (events) and PORT+1 (control), "
                        "encrypted and authenticated with CURVE; the keys are in engine.json (0600)")
    p.set_defaults(handler="engine.daemon.launch:cmd_run")

    eng = sub.add_parser("engine", help="runs on this machine: list, status, stop, pause, resume, save, eval, "
                                             "preview, replay")
    esub = eng.add_subparsers(dest="engine_command", metavar="COMMAND", required=True)
    p = esub.add_parser("list", help="runs under runs/ with state, step, loss, age",
                        description="One line per run: its name (cut to its column, ending in …; --json has it "
                                    "whole), state, step / total steps, loss, age and model.")
    # a Path default is not passed through type: a fresh clone without runs/ lists no runs
    p.add_argument("--runs", type=_runs_folder, default=Path("runs"), metavar="DIR",
                   help="the folder that holds the runs (default runs/)")
    p.add_argument("--json", metavar="OUT", help="write the list as JSON to OUT (- for stdout)")
    p.set_defaults(handler="engine.daemon.launch:cmd_engine")
    p = esub.add_parser("status", help="one run's state")
    p.add_argument("run", metavar="RUN", help="a run folder or a name under runs/")
    p.add_argument("--json", metavar="OUT", help="write the state as JSON to OUT (- for stdout)")
    p.set_defaults(handler="engine.daemon.launch:cmd_engine")
    p = esub.add_parser("stop", help="stop a run gracefully (the workers save first)")
    p.add_argument("run", metavar="RUN", help="a run folder or a name under runs/")
    p.add_argument("--wait", type=_seconds, default=120.0, metavar="S",
                   help="seconds to wait for the engine to exit, the stop's delivery included (default 120; 0: deliver "
                        "the stop and return); an engine that does not take the stop in S s (3 at least, 15 at most) "
                        "is reported, with the pid to kill")
    p.set_defaults(handler="engine.daemon.launch:cmd_engine")
    for name, help, then in (
            ("pause", "pause a run at its next step boundary", "until the run shows paused (default 60; 0: do not wait)"),
            ("resume", "run a paused run again", "until the run shows running again (default 60; 0: do not wait)"),
            ("save", "save a checkpoint at the next step boundary", None),
            ("eval", "evaluate on the validation rows at the next step boundary", None),
            ("preview", "generate the previews at the next step boundary", None)):
        p = esub.add_parser(name, help=help,
                            description=f"{help[0].upper()}{help[1:]}, through the run's engine (as the dashboard's "
                                        "key does), and say what happened in one line. Exit 0 when the engine took "
                                        "it, 1 when it refused (the reason said) or no engine runs to take it.")
        p.add_argument("run", metavar="RUN", help="a run folder or a name under runs/")
        if then:
            p.add_argument("--wait", type=_seconds, default=60.0, metavar="S", help=f"seconds to wait {then}")
        p.set_defaults(handler="engine.daemon.launch:cmd_engine")
    p = esub.add_parser("replay", help="serve a recorded events.jsonl from a real engine (demos, deterministic tests)",
                        description="Starts a detached engine whose worker sends it the events of EVENTS (a run's "
                                    "events.jsonl), each with the time it was recorded at — sent all at once, or "
                                    "--rate N a second, not at the pace they were recorded — then waits; attach to "
                                    "it, stop it with engine stop.")
    p.add_argument("events", metavar="EVENTS.jsonl", help="a run's events.jsonl")
    p.add_argument("--run-dir", metavar="DIR", help="the new run folder (default runs/replay-<name>)")
    p.add_argument("--rate", type=float, default=0.0, metavar="N", help="events sent per second (default 0: all at once; the times they say are the recorded ones either way)")
    p.set_defaults(handler="engine.daemon.replay:cmd_replay")


def _eval_parsers(sub) -> None:
    """voxtui infer, score, export, export-metrics."""
    p = sub.add_parser("infer", help="generations and metrics from a run's checkpoint",
                       description="Base model + adapter with the run's own config. Without --checkpoint: lora_final, "
                                   "else the latest complete checkpoint. Results: runs/<run>/infer/<name>/.")
    p.add_argument("--run", metavar="RUN", help="a run folder or a name under runs/")
    p.add_argument("--output_dir", metavar="DIR", help="the seed's form: a folder with checkpoint-N or lora_stage1")
    p.add_argument("--checkpoint", type=_checkpoint, metavar="N", help="use checkpoint-N (N or checkpoint-N)")
    p.add_argument("--all-checkpoints", dest="all_checkpoints", action="store_true",
                   help="every complete checkpoint: a table of metrics by step")
    p.add_argument("--data", metavar="FILE", help="JSONL rows with the reference in output")
    p.add_argument("--jsonl", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--name", help="the folder under infer/ (default: <checkpoint>-<data file>, or <that>-2, -3, … "
                                  "when it holds results of other settings: they are kept; with --all-checkpoints, "
                                  "NAME-checkpoint-N). A NAME holding results of other settings is refused")
    p.add_argument("--batch_size", type=_positive_int, default=None,
                   help="rows decoded together, continuously refilled as rows finish (default: 64 on a GPU, 8 on "
                        "the CPU)")
    p.add_argument("--max_new_tokens", type=_positive_int, default=128,
                   help="the longest answer generated, in tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="in [0, 2]; 0: greedy (default)")
    p.add_argument("--top_p", type=float, default=1.0, help="in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed, with --temperature above 0 (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="split the rows over N processes, one GPU each (without GPUs: N CPU processes); one "
                        "merged result")
    p.add_argument("--no-perplexity", dest="no_perplexity", action="store_true", help="skip teacher-forced perplexity")
    p.add_argument("--events", help=argparse.SUPPRESS)  # the engine's PULL endpoint, when it starts the job
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON (- for stdout)")
    p.set_defaults(handler="engine.eval.infer:cmd_infer")

    p = sub.add_parser("score", help="metrics for rows that hold prediction and the reference output",
                       description="Scores every row holding the strings prediction and output; a bad line is "
                                   "named on stderr, skipped, and listed in the JSON's bad_rows. Exit 2 when no "
                                   "row can be scored. An empty prediction of an empty reference (or two texts "
                                   "with no word or character to compare, only spaces and punctuation) is a "
                                   "perfect match: exact match, ROUGE-L and length ratio 1.0 (BLEU 100 for a file "
                                   "of such pairs only).")
    p.add_argument("file", metavar="FILE", help="JSONL rows with prediction and output (an infer's "
                                             "runs/<run>/infer/<job>/generations.jsonl)")
    p.add_argument("--json", metavar="OUT", help="write the metrics as JSON to OUT (- for stdout)")
    p.set_defaults(handler="engine.eval.score:cmd_score")

    p = sub.add_parser("export", help="merge a run's adapter into the base weights for serving")
    p.add_argument("--run", metavar="RUN", help="a run folder or a name under runs/ (its lora_final, else its "
                                                "latest complete checkpoint)")
    p.add_argument("--output_dir", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=_checkpoint, metavar="N", help="use checkpoint-N (N or checkpoint-N)")
    p.add_argument("--merge", required=True, metavar="OUT", help="folder for the merged model")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the merged weights' type (default bf16)")
    p.set_defaults(handler="engine.eval.export:cmd_export")

    p = sub.add_parser("export-metrics", help="every scalar of a run by step, as CSV or JSON",
                       description="Reads the run's events.jsonl (no engine needed; a running run is read as far as "
                                   "it has got): one row per step, one column per scalar (train/loss, train/lr, "
                                   "train/grad_norm, perf/tokens_per_s, perf/mfu, mem/peak_gib, eval/loss, eval/ppl, "
                                   "infer/rougeL, gpu/0/util, host/rss_gib, …; docs/evaluation.md). A line that is not "
                                   "a usable event stops it with exit 2 and one line naming the line and field "
                                   "(--skip-bad reads past them); so does a RUN with no scalars. The output file is "
                                   "written under a temp name and renamed.")
    p.add_argument("run", metavar="RUN", help="a run folder, a name under runs/, or an events.jsonl file")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="OUT", help="write CSV to OUT (the default, to stdout; - for stdout)")
    out.add_argument("--json", metavar="OUT", help='write {"run", "columns", "rows", …} as JSON to OUT (- for stdout)')
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                   help="read past lines that are not usable events (each named on stderr, the first 20) instead "
                        "of stopping at the first")
    p.set_defaults(handler="engine.eval.export_metrics:cmd_export_metrics")


def _app_parsers(sub) -> None:
    """voxtui attach, demo."""
    p = sub.add_parser("attach", help="the dashboard: watch and steer a run (no RUN: pick from runs/)")
    p.add_argument("run", nargs="?", metavar="RUN", help="a run folder or a name under --runs (none: pick one)")
    p.add_argument("--runs", type=_runs_folder, default=Path("runs"), metavar="DIR",
                   help="the folder that holds the runs (default runs/)")
    p.add_argument("--no-notify", dest="no_notify", action="store_true",
                   help="no terminal bell / desktop notification when a run finishes, fails or raises an error alert")
    p.set_defaults(handler="app.main:attach")

    p = sub.add_parser("demo", help="the tiny model and the bundled sample data, end to end on the CPU")
    p.add_argument("--runs", default="runs", metavar="DIR", help="where runs and the demo model live (default runs/)")
    p.add_argument("--nproc", type=_positive_int, default=2, help="CPU ranks (default 2: a real DDP run)")
    p.add_argument("--no-attach", dest="no_attach", action="store_true",
                   help="start the run and return (attach later with voxtui attach)")
    p.set_defaults(handler="engine.commands:demo")


def _checkpoint(text: str) -> int:
    """``--checkpoint``: a step, N, or the folder's name, checkpoint-N."""
    try:
        return int(text.removeprefix("checkpoint-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step N or checkpoint-N, got {text!r}") from None


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The subcommand's parser that ``args`` came through (``voxtui data audit`` → audit's)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs else None
        if chosen not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="voxtui",
        description="Fine-tune the language model inside Mistral's Voxtral on text: data tools, preflight, "
                    "a headless training engine and a terminal dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"voxtui {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _data_parsers(sub)
    for add in (_model_parsers, _run_parsers, _eval_parsers, _app_parsers):
        add(sub)
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # answered by the (sub)command they were given to, with its --help
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    module, _, func = args.handler.partition(":")
    from importlib import import_module

    from engine.util import UsageError, printable

    try:
        return int(getattr(import_module(module), func)(args) or 0)
    except UsageError as e:
        print(f"voxtui: error: {printable(e)}", file=sys.stderr)  # it may quote a run's name, a path, a field
        return 2
    except KeyboardInterrupt:
        print("voxtui: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file it was given to read or write (util.atomic_write's "cannot write …")
        if e.filename is None and not (e.strerror or "").startswith("cannot write "):
            raise
        said = e.strerror if e.filename is None else f"{e.filename}: {e.strerror or e}"
        print(f"voxtui: error: {printable(said)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
