"""The messages between workers, engine and clients: msgspec tagged unions, versioned.

Documented in ``docs/protocol.md``. Schema evolution follows msgspec's rules: new fields get
defaults, a field never changes type, nothing is reordered.
"""

from __future__ import annotations

import time

import msgspec

PROTOCOL_VERSION = 1


class Message(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=False):
    """Envelope shared by every event: sequence number (per run, from 1), time, run id, version."""

    seq: int = 0
    time: float = 0.0
    run: str = ""
    v: int = PROTOCOL_VERSION
    # under the engine: which worker process sent it and its own count (1, 2, …), so that events a worker
    # kept in its spool while its engine was gone are replayed once and in order (docs/protocol.md)
    worker: str = ""
    wseq: int = 0

    @property
    def type(self) -> str:
        """The type tag (``step``, ``preview``, …), as on the wire."""
        return self.__struct_config__.tag


# ----------------------------------------------------------------------------- events


class Status(Message, tag="status"):
    state: str  # starting | running | paused | stopping | finished | failed
    message: str = ""
    step: int = 0
    # "pause": a pause was requested and the workers have not paused yet (they take it at their next step
    # boundary, then do what falls due there: an evaluation, previews, a checkpoint); the run is shown "pausing".
    # The engine writes a status with it when it forwards a pause; the next status (paused, or running again
    # when a pause is given up) clears it
    pending: str = ""
    # on finished: completed (all steps) | stopped (on request) | early_stopped | engine_lost (the workers
    # saved and stopped because their engine went away); empty otherwise
    outcome: str = ""


def shown_state(state: str, outcome: str = "", pending: str = "") -> str:
    """The state a person is told for a status: a run that finished because it was asked to stop is
    ``stopped``; one whose workers saved and stopped because their engine went away (outcome engine_lost)
    ``crashed`` (it did not finish: ``voxtui run --resume`` continues it); one whose pause is pending
    (``Status.pending``) ``pausing``, as ``voxtui engine list``, the dashboard and the foreground ``voxtui run``
    all say it."""
    state = with_pending(state, pending)
    if state == "finished" and outcome in ("stopped", "engine_lost"):
        return "stopped" if outcome == "stopped" else "crashed"
    return state


def with_pending(state: str, pending: str) -> str:
    """A status's state with its pending pause: ``pausing`` for a starting or running run whose pause the
    workers have not made yet (``Status.pending``), else the state as it is."""
    return "pausing" if state in ("starting", "running") and pending == "pause" else state


class Step(Message, tag="step"):
    step: int
    loss: float | None  # null when not finite (then ``nonfinite`` says which)
    lr: float
    grad_norm: float | None
    tokens_per_s: float  # real (non-pad) tokens per second, all ranks together
    epoch: float = 0.0
    tokens: int = 0  # real tokens in this step, all ranks
    tokens_per_s_rank: list[float] = []
    step_time: float = 0.0  # seconds, slowest rank
    step_time_rank: list[float] = []
    pad_frac: float = 0.0
    mfu: float | None = None  # 4 · matmul params FLOPs per real token / peak (needs --peak_tflops on a CPU)
    mfu_attn: float | None = None  # the same plus 12 · layers · heads · head_dim per causal query-key pair
    mem_allocated: float = 0.0  # GiB, rank 0's device
    mem_reserved: float = 0.0
    mem_peak: float = 0.0
    skipped: bool = False  # a non-finite loss or gradient: the update was not applied
    nonfinite: str = ""  # "loss" or "grad_norm" when that one was NaN / Inf


class Eval(Message, tag="eval"):
    step: int
    loss: float
    ppl: float
    tokens: int = 0
    best_loss: float = 0.0
    best_step: int = 0
    improved: bool = False
    patience_left: int = 0


class Preview(Message, tag="preview"):
    step: int
    prompt: str
    text: str
    temperature: float
    top_p: float
    max_new_tokens: int = 0
    index: int = 0  # which preview prompt
    reference: str = ""
    rank: int = 0
    seed: int = 0
    rougeL: float | None = None  # against the reference, with the evaluation's metric code


class PreviewStart(Message, tag="preview_start"):
    """Previews are being generated now: training waits until their ``preview`` events come (a reader
    that does not know this type skips it, as any event it cannot decode)."""

    step: int
    count: int = 0  # how many preview prompts
    max_new_tokens: int = 0  # the most new tokens each may get (after any cap: see Previews.params)


class Checkpoint(Message, tag="checkpoint"):
    step: int
    path: str
    best: bool = False
    val_loss: float | None = None
    final: bool = False


class Alert(Message, tag="alert"):
    level: str  # info | warning | error
    kind: str  # nan_loss, loss_spike, rank_died, …
    message: str
    rank: int | None = None
    step: int | None = None


class ParamRow(msgspec.Struct, array_like=True):
    module: str
    trainable: int
    frozen: int
    quantized: int


class ParamTable(Message, tag="param_table"):
    rows: list[ParamRow]
    trainable: int
    total: int


class GpuStat(msgspec.Struct, kw_only=True):
    index: int
    name: str = ""
    util: float = 0.0  # percent
    mem_used: float = 0.0  # GiB
    mem_total: float = 0.0
    power: float = 0.0  # W
    temp: float = 0.0  # °C
    sm_clock: float = 0.0  # MHz
    throttle: list[str] = []


class Telemetry(Message, tag="telemetry"):
    host: str = ""
    rank: int = 0
    gpus: list[GpuStat] = []
    cpu_percent: float | None = None  # on a CPU run: the worker process
    rss: float | None = None  # GiB
    mem_used_frac: float | None = None  # the host's memory in use


class RunInfo(Message, tag="run_info"):
    """Sent once at the start: what this run is."""

    model_id: str
    world_size: int
    device: str
    train_rows: int
    val_rows: int
    total_steps: int
    steps_per_epoch: int
    config: dict = {}
    cache_hit: bool = False
    dropped_long: int = 0
    truncated_long: int = 0
    preview: dict = {}  # the preview parameters in force (a resumed run keeps the ones set before it stopped)


class Log(Message, tag="log"):
    level: str = "info"
    message: str = ""
    rank: int = 0


class Ack(Message, tag="ack"):
    """A command was applied by the workers, at this step boundary."""

    id: str
    command: str
    step: int = 0
    params: dict = {}  # set_preview_params: the preview parameters now in force (temperature, top_p, max_new_tokens)


class Inference(Message, tag="inference"):
    """Progress and results of an inference job on a checkpoint."""

    name: str
    checkpoint: str
    state: str  # started | progress | finished | failed
    done: int = 0
    total: int = 0
    metrics: dict = {}
    path: str = ""
    message: str = ""
    samples: list[dict] = []  # on "finished": the first rows, {line, prompt, prediction, reference, rougeL}


Event = Status | Step | Eval | Preview | PreviewStart | Checkpoint | Alert | ParamTable | Telemetry | RunInfo | Log | Ack | Inference

# ----------------------------------------------------------------------------- commands


class Command(msgspec.Struct, kw_only=True, tag_field="type", forbid_unknown_fields=True):
    id: str = ""  # client-chosen, for replies and de-duplication
    v: int = PROTOCOL_VERSION

    @property
    def type(self) -> str:
        return self.__struct_config__.tag


# The limits of the preview (sampling) parameters, owned here and nowhere else: the dashboard's inputs,
# this command, the run's config (--temperature, --top_p, --max_new_tokens) and `voxtui infer` all ask
# preview_param_problems.
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0  # [0, 2]; 0: greedy
TOP_P_MIN, TOP_P_MAX = 0.0, 1.0  # (0, 1]: 0 itself would keep no token
# [1, 512]: a preview stops training until it ends, so it stays short (about as long as a few steps on a GPU;
# `voxtui infer` has no such limit). The worker also caps it at the model's positions less the longest
# preview prompt (evaluation.Previews).
MAX_NEW_TOKENS_MIN, MAX_NEW_TOKENS_MAX = 1, 512


def preview_param_problems(temperature: float | None = None, top_p: float | None = None,
                           max_new_tokens: int | None = None, *, names: dict[str, str] | None = None,
                           got: bool = False) -> list[str]:
    """What is wrong with these preview parameters, one line each (empty: nothing). ``None`` is not
    checked (unchanged / not given). ``names`` maps a field to the name the user typed (``--top_p``,
    ``top-p``); ``got`` adds the value given. NaN is out of every range."""
    names = names or {}
    out = []
    for field, value, ok, limits in (
            ("temperature", temperature, lambda v: TEMPERATURE_MIN <= v <= TEMPERATURE_MAX,
             f"[{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}]"),
            ("top_p", top_p, lambda v: TOP_P_MIN < v <= TOP_P_MAX, f"({TOP_P_MIN:g}, {TOP_P_MAX:g}]"),
            ("max_new_tokens", max_new_tokens, lambda v: MAX_NEW_TOKENS_MIN <= v <= MAX_NEW_TOKENS_MAX,
             f"[{MAX_NEW_TOKENS_MIN}, {MAX_NEW_TOKENS_MAX}]")):
        if value is not None and not ok(value):
            out.append(f"{names.get(field, field)} must be in {limits}" + (f" (got {value})" if got else ""))
    return out


class SetPreviewParams(Command, tag="set_preview_params"):
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None

    def problems(self) -> list[str]:
        return preview_param_problems(self.temperature, self.top_p, self.max_new_tokens)


class PreviewNow(Command, tag="preview_now"):
    pass


class SaveCheckpoint(Command, tag="save_checkpoint"):
    pass


class Pause(Command, tag="pause"):
    pass


class Resume(Command, tag="resume"):
    pass


class Stop(Command, tag="stop"):
    pass


class EvalNow(Command, tag="eval_now"):
    pass


class RunInference(Command, tag="run_inference"):
    checkpoint: int | None = None
    data: str = ""


class Heartbeat(Command, tag="heartbeat"):
    """Engine → workers, about once a second: the engine is alive. Not accepted from clients."""


AnyCommand = SetPreviewParams | PreviewNow | SaveCheckpoint | Pause | Resume | Stop | EvalNow | RunInference | Heartbeat
CLIENT_COMMANDS = ("set_preview_params", "preview_now", "save_checkpoint", "pause", "resume", "stop", "eval_now",
                   "run_inference")

# ----------------------------------------------------------------------------- client ↔ engine


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A client's request to the engine's ROUTER, sent with an HMAC-SHA256 signature frame."""

    op: str  # "command" | "history" | "status"
    command: AnyCommand | None = None
    after: int = 0  # history: events with seq > after
    limit: int = 2000
    time: float = 0.0  # replays older than five minutes are refused
    nonce: str = ""
    v: int = PROTOCOL_VERSION


class Reply(msgspec.Struct, kw_only=True):
    status: str  # "ok" | "error"
    reason: str = ""
    id: str = ""  # the command's id
    last: int = 0  # history: seq of the last event sent; status: the run's last seq
    more: bool = False  # history: more events follow
    state: str = ""
    # status: the run as the engine knows it (a reader whose events.jsonl cannot say asks): the last step
    # trained and its loss, the steps planned, how the run finished (Status.outcome)
    step: int | None = None
    loss: float | None = None
    total_steps: int | None = None
    outcome: str = ""
    pending: str = ""  # status: "pause" while a pause is pending (as Status.pending)
    message: str = ""  # status: the run's last status message (a reader whose events.jsonl lags behind asks)
    v: int = PROTOCOL_VERSION


event_encoder = msgspec.json.Encoder()
event_decoder = msgspec.json.Decoder(Event)
command_decoder = msgspec.json.Decoder(AnyCommand)
request_decoder = msgspec.json.Decoder(Request)
reply_decoder = msgspec.json.Decoder(Reply)


def stamp(event: Message, seq: int, run: str = "") -> Message:
    event.seq = seq
    event.time = event.time or time.time()
    event.run = run or event.run
    return event


def decode(decoder: msgspec.json.Decoder, raw: bytes):
    """``(message, None)`` or ``(None, reason)``: the one guard around every decode of bytes that came
    from another process (any decode failure, not only the expected one, is an answer, never a crash)."""
    try:
        return decoder.decode(raw), None
    except (msgspec.DecodeError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:
        return None, f"{type(e).__name__}: {e}"[:300]
