"""The run configuration: one typed Struct, read from TOML and/or flags, checked all at once.

Flags keep the seed script's names (``--per_device_bsz``, ``--grad_accum``…). A TOML file holds the
same fields; flags override it; the resolved config is saved as ``runs/<run>/config.toml``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import msgspec

from engine.protocol import preview_param_problems
from engine.util import UsageError, atomic_write

DEFAULT_MODEL = "mistralai/Voxtral-Mini-3B-2507"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, dict=True):
    """Everything a run needs. Each field is also a ``--flag`` of the same name.

    ``bf16 = "auto"`` (the default) is settled when the config is made (``bf16_auto``): an instance
    always holds true or false, and ``bf16_reason`` says why when it was chosen here."""

    model_id: str = DEFAULT_MODEL
    """Hub id or local folder of a VoxtralForConditionalGeneration checkpoint."""
    train_jsonl: str = ""
    """Training rows (JSONL: {instruction, input, output} or {messages})."""
    val_jsonl: str = ""
    """Validation rows; empty: no evaluation."""
    output_dir: str = ""
    """The run folder (default: runs/<timestamp>); one that holds a run is refused (--resume continues it)."""
    per_device_bsz: int = 4
    """Micro-batch size per rank: sequences, or with --packing a budget of this many × --max_len tokens."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    epochs: float = 1.0
    """Passes over the training data (ignored when --max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to run; 0: from --epochs."""
    lr: float = 2e-4
    """Peak learning rate (AdamW on the adapter weights)."""
    warmup_steps: int = 10
    """Linear warm-up steps, then cosine decay to min_lr_ratio × lr."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule, as a share of --lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 weights and compute. No flag (auto): bf16 where the hardware has it, a GPU of compute
    capability 8.0 or newer or a CPU with bf16 units (avx512_bf16 / amx_bf16), fp32 elsewhere (where bf16 is
    emulated and many times slower); the run's config.toml records the choice, preflight says why."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere and newer."""
    grad_ckpt: bool = True
    """Gradient checkpointing of the decoder layers."""
    grad_ckpt_layers: int = -1
    """With --grad_ckpt: how many decoder layers (the first N) recompute their activations in the backward;
    the others keep them, which is faster and takes more memory (voxtui preflight recommends the fewest that
    fit). -1: all."""
    quant: Literal["nf4", "none", "fp8"] = "nf4"
    """nf4: 4-bit NF4 QLoRA (double quantisation, bf16 compute); none: LoRA on the weights as they are (bf16,
    or fp32 with --no-bf16); fp8: the language model's projections in float8 with a scale per weight row (1
    byte per weight; GPUs of compute capability 8.9+; which products are FP8 ones: --fp8_products)."""
    fp8_products: Literal["auto", "none", "backward", "mlp", "all"] = "auto"
    """Which products of the frozen projections run in FP8 (GPUs of compute capability 8.9+). none: no FP8
    products. backward: the input's gradients only (the forward's products as they are; on an H200 1.11× bf16
    LoRA's tokens/s, gradients as exact as the GPU tests ask; with --quant none an e4m3 copy of the weights:
    1 byte per weight more). mlp: the MLP's forward products too (--quant fp8 only; the attention
    projections' forward as it is: 1.20×, gradients within the GPU tests' bounds). all: every forward
    product too (--quant fp8 only: 1.24×, its adapters' gradients less exact). auto: backward with --quant none or fp8 on a Hopper GPU (where it was measured), none otherwise
    (the CPU's FP8 products are emulated; --quant fp8 there multiplies by its weights dequantised)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout (0.05 was the seed's; 0 trains 7% faster on an H200, docs/benchmarks.md)."""
    lora_targets: list[str] = msgspec.field(default_factory=lambda: list(LORA_TARGETS))
    """Projections of the language model that get adapters (never the audio tower)."""
    max_len: int = 1024
    """Longest formatted example in tokens."""
    long: Literal["truncate", "drop"] = "truncate"
    """Rows over --max_len: truncate the target, or drop the row."""
    packing: bool = True
    """Pack whole examples into one row of --per_device_bsz × --max_len tokens per micro-batch, attended
    example by example (varlen FlashAttention on a GPU), instead of padded rows."""
    compile: bool = True
    """On a GPU, torch.compile each decoder layer (one compiled region shared by all layers): fused
    norms, activations and LoRA arithmetic; about 20 s at start, cached on disk. The previews' decoding
    step is compiled too (a few seconds at the first preview). Not used on the CPU."""
    grad_sync: Literal["flat", "ddp"] = "flat"
    """Several GPUs: how the adapter gradients are summed. flat: one all-reduce of all of them after the
    step's backward (27 M values for r=16: a two-H200 step is as long as a one-H200 step), the model runs
    exactly as on one GPU; ddp: torch's DistributedDataParallel, which overlaps bucketed all-reduces with
    the backward (worth trying across nodes on a slow network, or with a large --lora_r)."""
    group_by_length: bool = True
    """Without packing: batch rows of similar length together (the seed's grouping)."""
    seed: int = 42
    """Seeds data order, dropout and previews."""
    save_steps: int = 100
    """Checkpoint every N optimizer steps (0: only at the end and on request)."""
    save_total_limit: int = 3
    """Keep the last N checkpoints (plus the best)."""
    eval_steps: int = 100
    """Validation loss every N steps (0: only at the end)."""
    early_stopping_patience: int = 0
    """Stop after N evaluations without improvement (0: never)."""
    early_stopping_min_delta: float = 0.0
    """Improvement smaller than this does not count."""
    preview_steps: int = 100
    """Preview generations every N steps (0: off)."""
    preview_budget: float = 0.02
    """The most share of training time previews may take: a preview that comes due sooner is postponed
    until enough training has passed since the last (0: no limit; "preview now" is never postponed)."""
    preview_file: str = ""
    """JSONL rows whose prompts are previewed (default: the first rows of --val_jsonl)."""
    preview_count: int = 4
    """How many preview prompts."""
    temperature: float = 0.7
    """Preview sampling temperature (0: greedy)."""
    top_p: float = 0.9
    """Preview nucleus sampling."""
    max_new_tokens: int = 64
    """Preview length: the most new tokens per preview prompt, in [1, 512] (training waits while previews
    are generated); the worker also cuts it to the model's positions less the longest preview prompt."""
    on_nan: Literal["skip", "stop"] = "skip"
    """A NaN / Inf loss or gradient: skip the step, or save the last good state and stop."""
    log_steps: int = 1
    """Telemetry every N optimizer steps."""
    telemetry_interval: float = 1.0
    """Seconds between GPU / CPU telemetry samples (0: off)."""
    cache_dir: str = ""
    """Where pre-tokenised data is cached (default: runs/_cache beside the run folder)."""
    nproc: int = 1
    """Ranks (torchrun --nproc_per_node) when launched by voxtui run."""
    peak_tflops: float = 0.0
    """bf16 matmul peak per device for MFU (0: look the device up)."""
    alert_action: Literal["warn", "save", "stop"] = "warn"
    """What the engine does on a health alert (loss spike, grad-norm blow-up, throughput drop, throttling)."""
    engine: str = ""
    """The engine's endpoints file (engine.json) when running under voxtui run; empty: standalone."""
    engine_timeout: float = 30.0
    """Under voxtui run: seconds without the engine's heartbeat after which the workers save and stop
    (the environment variable VOXTUI_ENGINE_TIMEOUT, when set, overrides it; tests set it low)."""

    def __post_init__(self) -> None:
        self.bf16_reason = ""  # not a field: why "auto" chose what it chose (empty: set explicitly)
        if self.bf16 == "auto":
            self.bf16, self.bf16_reason = bf16_auto()

    def validate(self, files: dict[str, str] | None = None, flags: Collection[str] | None = None) -> None:
        """Collect every problem, then raise once. The field at fault is named as the user set it: ``files``
        maps the fields whose value came from a config file to that file (a problem with one reads
        ``run.toml: fp8_products = "all" needs quant = "fp8" …``), any other as its flag
        (``--fp8_products all needs --quant fp8 …``); another field a problem names is named as its flag when
        it is one of ``flags`` (given as flags), as a file's field when a file set it (its value in force with
        that file's name, when the problem does not start with it: ``got quant = "none" in run.toml``), else
        like the field at fault. Without ``files``: every field as its flag."""
        files = files or {}
        problems: list[str] = []

        def in_file(field: str, about: str) -> bool:
            """Whether ``field`` is named as in a file, in a problem about ``about``: the field at fault as it
            was set; another one as it was set too (a flag, or a file's field), and one left at its default
            as the field at fault is."""
            if field == about:
                return field in files
            if flags is not None and field in flags:
                return False
            return field in files or about in files

        def name(field: str, about: str = "") -> str:
            return field if in_file(field, about or field) else f"--{field}"

        def setting(field: str, about: str = "", value: object = None, got: bool = False) -> str:
            """``--field value`` or ``field = value`` (the field's own value unless ``value`` is given); ``got``:
            the value in force, said with its file when that is not the one the problem starts with."""
            about = about or field
            v = getattr(self, field) if value is None else value
            if in_file(field, about):
                elsewhere = got and field != about and field in files and files.get(about) != files[field]
                return f"{field} = {toml_value(v)}" + (f" in {files[field]}" if elsewhere else "")
            return f"--{field} {','.join(v) if isinstance(v, list) else v}"

        def add(about: str, text: str) -> None:
            problems.append(f"{files[about]}: {text}" if about in files else text)

        if not self.train_jsonl:
            add("train_jsonl", f"{name('train_jsonl')} is required")
        for field in ("train_jsonl", "val_jsonl", "preview_file"):
            value = getattr(self, field)
            if value and not Path(value).is_file():
                add(field, f"{setting(field)}: " + ("a folder, not a JSONL file" if Path(value).is_dir() else
                                                    "no such file"))
        for field in ("per_device_bsz", "grad_accum", "max_len", "lora_r", "lora_alpha", "nproc", "log_steps"):
            if getattr(self, field) <= 0:
                add(field, f"{name(field)} must be above 0 (got {getattr(self, field)})")
        for field in ("max_steps", "warmup_steps", "save_steps", "eval_steps", "preview_steps", "preview_count",
                      "save_total_limit", "early_stopping_patience"):
            if getattr(self, field) < 0:
                add(field, f"{name(field)} must be 0 or more (got {getattr(self, field)})")
        if not math.isfinite(self.epochs):
            add("epochs", f"{name('epochs')} must be a finite number (got {self.epochs})")
        elif self.max_steps == 0 and self.epochs <= 0:
            add("epochs", f"set {name('epochs')} above 0 or {name('max_steps', 'epochs')}")
        if self.seed < 0:
            add("seed", f"{name('seed')} must be 0 or more (got {self.seed})")
        for field in ("weight_decay", "max_grad_norm", "peak_tflops"):
            v = getattr(self, field)
            if not (math.isfinite(v) and v >= 0):
                add(field, f"{name(field)} must be 0 or more (got {v})")
        if not 0 <= self.min_lr_ratio <= 1:
            add("min_lr_ratio", f"{name('min_lr_ratio')} must be in [0, 1] (got {self.min_lr_ratio})")
        blocking = _under_a_file(self.output_dir) if self.output_dir else ""
        if blocking:
            add("output_dir", f"{setting('output_dir')}: {blocking} is a file, not a folder")
        if not 0 <= self.preview_budget < 1:
            add("preview_budget", f"{name('preview_budget')} must be in [0, 1) (got {self.preview_budget})")
        if not self.engine_timeout > 0:
            add("engine_timeout", f"{name('engine_timeout')} must be above 0 (got {self.engine_timeout})")
        if self.telemetry_interval < 0:
            add("telemetry_interval", f"{name('telemetry_interval')} must be 0 (off) or more "
                                      f"(got {self.telemetry_interval})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            add("lr", f"{name('lr')} must be above 0 (got {self.lr})")
        if not 0 <= self.lora_dropout < 1:
            add("lora_dropout", f"{name('lora_dropout')} must be in [0, 1) (got {self.lora_dropout})")
        if self.fp8_products in ("all", "mlp") and self.quant != "fp8":
            quant_fp8 = setting("quant", "fp8_products", "fp8")
            add("fp8_products", f"{setting('fp8_products')} needs {quant_fp8} (its forward's FP8 products multiply "
                                f"by the FP8 weights; got {setting('quant', 'fp8_products', got=True)}): add {quant_fp8}"
                                + (f", or use {setting('fp8_products', value='backward')}"
                                   if self.quant == "none" else ""))
        if self.fp8_products == "backward" and self.quant == "nf4":
            fp8 = '"fp8"' if in_file("quant", "fp8_products") else "fp8"
            add("fp8_products", f"{setting('fp8_products')} needs {setting('quant', 'fp8_products', 'none')} or "
                                f"{fp8} (NF4's products are bf16 ones on its dequantised weights)")
        if self.grad_ckpt_layers < -1:
            add("grad_ckpt_layers", f"{name('grad_ckpt_layers')} must be -1 (all) or 0 or more "
                                    f"(got {self.grad_ckpt_layers})")
        for field in ("temperature", "top_p", "max_new_tokens"):
            for problem in preview_param_problems(**{field: getattr(self, field)}, got=True,
                                                  names={field: name(field)}):
                # a run's file can hold a value allowed when it was written (max_new_tokens went to 512)
                add(field, problem + (f"; --{field} given with the command replaces the file's value"
                                      if field in files else ""))
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or not self.lora_targets:
            add("lora_targets", f"{name('lora_targets')} must be among {','.join(LORA_TARGETS)} "
                                f"(got {','.join(self.lora_targets)})")
        if problems:
            raise UsageError("; ".join(problems))


FIELDS = TrainConfig.__struct_fields__



def field_docs() -> dict[str, str]:
    """The docstring under each field, for --help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    docs, body = {}, tree.body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs


def add_flags(parser: argparse.ArgumentParser, hidden: tuple[str, ...] = ()) -> None:
    """One flag per field, defaulting to None so that only flags actually given override the TOML; ``hidden``:
    fields taken but left out of ``--help`` (what a command sets itself)."""
    parser.add_argument("--config", metavar="RUN.toml", help="TOML file with the same fields; flags override it")
    docs = field_docs()
    defaults = {f.name: f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
                for f in msgspec.structs.fields(TrainConfig)}
    for name in FIELDS:
        default = defaults[name]
        doc = docs.get(name, "")
        shown = ",".join(default) if isinstance(default, list) else default if default != "" else "none"
        help_text = (doc if "(default:" in doc else f"{doc} (default: {shown})").replace("%", "%%")
        if name in hidden:
            help_text = argparse.SUPPRESS
        values = literal_values(name)
        if isinstance(default, bool) or name == "bf16":
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(f"--{name}", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                                default=None, metavar="A,B,…", help=help_text)
        elif values:
            parser.add_argument(f"--{name}", choices=values, default=None, metavar="{" + ",".join(values) + "}",
                                help=help_text)
        else:
            parser.add_argument(f"--{name}", type=type(default), default=None, help=help_text)


@functools.cache
def literal_values(name: str) -> tuple[str, ...]:
    """The values a ``Literal[...]`` field of TrainConfig takes (empty for other fields)."""
    import typing

    hint = typing.get_type_hints(TrainConfig).get(name)
    return tuple(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else ()


def resolve(args: argparse.Namespace) -> TrainConfig:
    """TOML (if ``--config``) + flags → a checked TrainConfig. A problem with a value from a file names
    the field as the file writes it, and the file; one with a flag names the flag. The files: ``--config``,
    and a resumed run's config.toml (``merge_saved_config`` lists the fields it filled in
    ``args.config_sources``)."""
    values: dict = {}
    files: dict[str, str] = {}
    if getattr(args, "config", None):
        data = read_toml(args.config)
        values.update(data)
        files.update(dict.fromkeys(data, str(args.config)))
    saved = getattr(args, "config_sources", None) or {}
    flags = set()
    for name in FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
            if name in saved:
                files[name] = saved[name]
            else:
                flags.add(name)
                files.pop(name, None)
    try:
        cfg = msgspec.convert(values, TrainConfig)
    except msgspec.ValidationError as e:
        field, text = _field_error(e)
        if field in files and text.startswith(f"{field}: "):  # the field as the file writes it, and its value
            raise UsageError(f"{files[field]}: {field} = {_shown(values[field])}: {text[len(field) + 2:]}") from None
        where = files.get(field) or getattr(args, "config", None)
        raise UsageError(f"{where}: {text}" if where else f"config: {text}") from None
    cfg.validate(files, flags)
    return cfg


PATH_FIELDS = ("train_jsonl", "val_jsonl", "preview_file", "cache_dir")


def absolute_paths(cfg: TrainConfig) -> None:
    """A new run's files as absolute paths in its config.toml, so ``voxtui infer``, ``export`` and ``--resume``
    work from any folder: the data files, the cache folder, and ``model_id`` when it names a local folder (a hub
    id stays as it is). A relative path, on the command line or in a ``--config`` file, is taken from the
    current folder (``voxtui run`` and the worker alike)."""
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value:
            setattr(cfg, name, os.path.abspath(value))
    if cfg.model_id and Path(cfg.model_id).exists():
        cfg.model_id = os.path.abspath(cfg.model_id)


def read_toml(path: str | os.PathLike) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a TOML config file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}): a config file is UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: {str(e).splitlines()[0] if str(e) else 'not valid TOML'}") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UsageError(f"{path}: unknown field(s) {', '.join(unknown)}")
    return data


def _field_error(e: msgspec.ValidationError) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.per_device_bsz`" as ("per_device_bsz",
    "per_device_bsz: expected int, got str") (the field is "" when the error names none)."""
    text = str(e).splitlines()[0] if str(e) else "invalid value"
    msg, _, where = text.rpartition(" - at ")
    if msg and where.startswith("`$."):
        field = where.strip("`")[2:]
        if field == "bf16":
            return field, 'bf16: must be true, false or "auto"'
        values = literal_values(field) if field in FIELDS else ()
        if values:
            return field, f"{field}: {msg[0].lower()}{msg[1:]}".replace("`", "") + f" (one of {', '.join(values)})"
        return field, f"{field}: {msg[0].lower()}{msg[1:]}".replace("`", "")
    return "", text


@functools.lru_cache(maxsize=1)
def bf16_auto() -> tuple[bool, str]:
    """What ``bf16 = "auto"`` means on this machine, and why: bf16 on GPUs of compute capability 8.0 or
    newer (all of those the worker would use); with no CUDA GPU, bf16 where the CPU has bf16 units
    (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo) and fp32 elsewhere, since the worker keeps bf16
    weights on the CPU and without those units every bf16 matmul is emulated. Needs no torch import."""
    gpus = _gpus()
    if gpus:
        names = ", ".join(sorted({name for name, _ in gpus}))
        old = [(name, cc) for name, cc in gpus if cc < (8, 0)]
        if old:
            name, cc = old[0]
            return False, (f"{name} has compute capability {cc[0]}.{cc[1]}, below 8.0: no bf16 units, "
                           "so fp32")
        return True, f"{names}: compute capability 8.0 or newer has bf16 units"
    flags = _cpu_flags()
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if have:
        return True, f"no CUDA GPU, and this CPU has bf16 units ({', '.join(have)})"
    return False, ("no CUDA GPU, and this CPU has no bf16 units (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): "
                   "bf16 would be emulated, many times slower than fp32")


def _gpus() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of each CUDA GPU the worker would see: through torch when it is
    imported already, else through NVML (none when torch is a CPU build or CUDA_VISIBLE_DEVICES hides them)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if not torch.cuda.is_available():
            return []
        return [(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    try:
        from importlib.metadata import version

        if "+cpu" in version("torch"):
            return []
    except Exception:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                out.append((name.decode() if isinstance(name, bytes) else name,
                            tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML: ask torch (a CUDA build; slower to import, so only now)
        try:
            import torch
        except ImportError:
            return []
        if not torch.cuda.is_available():
            return []
        return [(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())]
    if visible:
        picked = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        if picked and len(picked) == len(visible.split(",")):
            out = [out[i] for i in picked if i < len(out)]
    return out


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _under_a_file(path: str) -> str:
    """The file that ``path`` or a folder above it is (so no folder can be made there), else ""."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            return "" if q.is_dir() else str(q)
    return ""


def _shown(v: object, limit: int = 60) -> str:
    """A value read from a file, for a one-line error: as TOML writes it, cut at ``limit`` characters."""
    try:
        text = toml_value(v)
    except (TypeError, ValueError, msgspec.EncodeError):
        text = repr(v)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def toml_value(v: object) -> str:
    """A field's value as TOML writes it (``true``, ``16``, ``"nf4"``, ``["q_proj"]``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(msgspec.json.encode(x).decode() for x in v) + "]"
    return msgspec.json.encode(v).decode()  # a JSON string is a valid TOML basic string


def to_toml(cfg: TrainConfig) -> str:
    return "\n".join(f"{name} = {toml_value(getattr(cfg, name))}" for name in FIELDS) + "\n"


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    with atomic_write(path) as f:
        f.write(to_toml(cfg))
