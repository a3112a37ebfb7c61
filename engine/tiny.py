"""``voxtui model tiny OUT``: a small random-weight Voxtral with the real Tekken tokenizer.

The model is a real ``VoxtralForConditionalGeneration`` built from a real ``VoxtralConfig``: a
two-layer Llama-style language model (hidden 64) with the full 131072-token vocabulary, and a
one-layer audio tower. Weights are seeded, so the same command writes the same files.

``--force`` replaces only a folder that is plainly a tiny model this command wrote: nothing in it but the
files it writes (``TINY_FILES``), and either its marker or a config.json of the tiny model's shape (folders
written before the marker). Anything else — run folders, ``.git``, a merged export, other files — is
refused with the folder's contents named, and nothing is touched. The new model is built in a temp folder
beside OUT and renamed into place, so a failure leaves the old one as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

from engine.formatting import bundled_tekken_path
from engine.util import UsageError, printable

MARKER = ".voxtui-tiny"
"""An empty file in every tiny model folder: ``--force`` may replace the folder."""
TINY_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tekken.json", MARKER})
_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 131072}
_AUDIO = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def tiny_config():
    from transformers import VoxtralConfig

    return VoxtralConfig(
        audio_config={**_AUDIO, "num_mel_bins": 128, "max_source_positions": 1500},
        text_config={
            "model_type": "llama", **_TEXT,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "initializer_range": 0.1,  # wide enough that a small adapter can visibly fit data
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
            "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"},
        },
        hidden_size=64,
    )


def _has_tiny_config(folder: Path) -> bool:
    """Whether ``folder/config.json`` describes the tiny model (what a folder written before the marker has)."""
    try:
        cfg = json.loads((folder / "config.json").read_bytes())
        text, audio = cfg["text_config"], cfg["audio_config"]
        return (cfg.get("model_type") == "voxtral" and all(text.get(k) == v for k, v in _TEXT.items())
                and all(audio.get(k) == v for k, v in _AUDIO.items()))
    except Exception:  # unreadable, not JSON, another shape: not the tiny model's
        return False


def _listing(names: list[str], folder: Path, limit: int = 6) -> str:
    """``a/, b.txt, .git/ and 4 more``: what a folder holds (folders marked with a slash)."""
    shown = [n + ("/" if (folder / n).is_dir() and not (folder / n).is_symlink() else "") for n in sorted(names)[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return printable(", ".join(shown) + more)


def replaceable(out: Path) -> str | None:
    """None when ``--force`` may replace the existing folder ``out`` (empty, or a tiny model this command
    wrote), else why not, as the end of a sentence about ``out``."""
    try:
        names = os.listdir(out)
    except OSError as e:
        return f"cannot be read ({e.strerror}): nothing was changed"
    foreign = [n for n in names if n not in TINY_FILES or not stat.S_ISREG(os.lstat(out / n).st_mode)]
    if foreign:
        return (f"holds {_listing(foreign, out)}, which voxtui model tiny does not write: --force replaces only a "
                f"folder of a tiny model it wrote, so nothing was changed (give another OUT)")
    if names and MARKER not in names and not _has_tiny_config(out):
        return (f"holds {_listing(names, out)}, but its config.json is not the tiny model's: --force replaces only "
                f"a folder of a tiny model voxtui model tiny wrote, so nothing was changed (give another OUT)")
    return None


def write_tiny_model(out: str | os.PathLike, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny model and its tokenizer to ``out`` (atomically: built in a temp folder beside it, renamed
    into place). With ``force``, an existing tiny model there is replaced; anything else is refused."""
    given = Path(out)
    out = Path(os.path.realpath(given))  # `.`, a symlink: the folder itself, so its temp sits beside it
    if given.name in ("", ".."):
        given = out  # messages name the folder, not `.`
    _check_out(given, out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise UsageError(f"{given}: cannot create it ({e.strerror}"
                         + (f": {e.filename}" if e.filename else "") + ")") from None
    import torch
    from transformers import VoxtralForConditionalGeneration

    try:
        try:
            torch.manual_seed(seed)
        except (ValueError, OverflowError, RuntimeError) as e:
            raise UsageError(f"--seed {seed}: not a usable seed ({e})") from None
        model = VoxtralForConditionalGeneration(tiny_config())
        model.generation_config.pad_token_id = 11
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(bundled_tekken_path(), tmp / "tekken.json")
        (tmp / MARKER).write_text("written by voxtui model tiny; --force may replace this folder\n")
        _check_out(given, out, force)  # again: something may have been put there while the model was built
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def _check_out(given: Path, out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"{given}: a file, not a folder (voxtui model tiny writes a folder); nothing was changed")
    if not force:
        if os.listdir(out):
            raise UsageError(f"{given}: exists and is not empty (use --force to replace a tiny model written here)")
        return
    why = replaceable(out)
    if why:
        raise UsageError(f"{given}: {why}")


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the folder ``tmp`` to ``out``; an existing ``out`` is moved aside first and deleted only once
    the new one stands in its place (it is moved back if that rename fails)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
