"""The one place that turns a row into ``(prompt_ids, target_ids)`` with the model's instruct template.

Data tools, training and inference all call :class:`ChatFormat`, so token counts agree everywhere.
The template is Mistral's instruct format as mistral-common writes it (tests check the equality)::

    <s>[INST]user 1[/INST]assistant 1</s>[INST]system\\n\\nuser 2[/INST]  |  assistant 2</s>
    ---------------------------- prompt ----------------------------  |  ---- target ----

Loss is applied to the target, which ends with EOS. Text is encoded in batches through the
Tekken tokenizer's tiktoken core
(data tools parallelise over processes, see ``engine.data.scan``).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from engine.rows import Example
from engine.util import UsageError, looks_local

TEMPLATE_VERSION = "mistral-instruct-v1"
BUNDLED_TEKKEN = "tekken_240911.json"


def bundled_tekken_path() -> Path:
    """The Tekken tokenizer file that the mistral-common package ships (131072 tokens)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / BUNDLED_TEKKEN


def resolve_tokenizer_file(model: str | os.PathLike | None) -> Path:
    """Where the tokenizer of ``model`` lives: a model folder's ``tekken.json``, a ``.json`` file,
    a hub id's ``tekken.json`` (from the local cache or the hub), or, with no model, the bundled Tekken."""
    if model is None or str(model) == "":
        return bundled_tekken_path()
    p = Path(model)
    if p.is_file():
        return p
    if p.is_dir():
        f = p / "tekken.json"
        if f.is_file():
            return f
        raise UsageError(f"{p}: no tekken.json in this model folder")
    if looks_local(model):  # a mistyped folder is said at once, never asked of the hub
        raise UsageError(f"{model}: no such tokenizer file or model folder")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(model), "tekken.json"))
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise UsageError(f"{model}: cannot get its tokenizer (tekken.json): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None


MAX_TOKENIZER_BYTES = 256 << 20  # Tekken files are 15–20 MB; anything far larger is something else


class TokenizerFileError(UsageError):
    """A tokenizer file that is there but does not load: ``<path>: not a Tekken tokenizer file (<why>)``."""


def _why(e: BaseException) -> str:
    """What was wrong with a tokenizer file, in a few words, from the exception its loading raised."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}"
    if isinstance(e, KeyError):
        return f"no {e.args[0]!r} field" if e.args else "a field is missing"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 160 else text[:157] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@lru_cache(maxsize=1)
def lazy_vocab_tekkenizer() -> type:
    """mistral-common's ``Tekkenizer`` whose ``vocab()`` list — every token's piece decoded one at a time, about
    half of a load's time (0.36 of 0.72 s on a 2-core CPU), in every worker, inference and data-tool process — is
    made when first asked for, not at load. Nothing here asks for it; ``id_to_piece`` and ``vocab()`` answer as the library's do (tested)."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    class LazyVocabTekkenizer(Tekkenizer):
        _loading = False
        _pieces: list[str] | None = None

        def __init__(self, *args, **kwargs) -> None:
            self._loading = True  # the library's __init__ lists every piece through id_to_piece: skipped here
            try:
                super().__init__(*args, **kwargs)
            finally:
                self._loading = False

        def id_to_piece(self, token_id: int) -> str:
            return "" if self._loading else super().id_to_piece(token_id)

        def vocab(self) -> list[str]:
            if self._pieces is None:
                self._pieces = [super(LazyVocabTekkenizer, self).id_to_piece(i) for i in range(self.n_words)]
            return self._pieces

        @property
        def _vocab(self) -> list[str]:  # the library's own name for that list: the same list, made on first use
            return self.vocab()

        @_vocab.setter
        def _vocab(self, value) -> None:  # (the placeholders its __init__ lists while loading are not kept)
            pass

    return LazyVocabTekkenizer


class ChatFormat:
    """Mistral instruct template over a Tekken tokenizer, with batch encoding."""

    def __init__(self, tokenizer_file: str | os.PathLike) -> None:
        self.path = Path(tokenizer_file)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise UsageError(f"{self.path}: cannot read the tokenizer file ({e.strerror})") from None
        if size > MAX_TOKENIZER_BYTES:
            raise TokenizerFileError(f"{self.path}: not a Tekken tokenizer file ({size / 2**20:.0f} MiB: larger than "
                                     f"any tokenizer; a model folder's is its tekken.json)")
        try:
            self._load()
        except (KeyboardInterrupt, SystemExit):
            raise
        except PermissionError as e:
            raise UsageError(f"{self.path}: cannot read the tokenizer file ({e.strerror})") from None
        except BaseException as e:  # any shape of bad file: json, KeyError, TypeError, pydantic, tiktoken's panics
            raise TokenizerFileError(f"{self.path}: not a Tekken tokenizer file ({_why(e)})") from None

    def _load(self) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tekken = lazy_vocab_tekkenizer().from_file(str(self.path))
            self.bos = self.tekken.bos_id
            self.eos = self.tekken.eos_id
            self.pad = self.tekken.pad_id
            self.inst = self.tekken.get_special_token("[INST]")
            self.inst_end = self.tekken.get_special_token("[/INST]")
        self.vocab_size = self.tekken.n_words
        self._offset = self.tekken.num_special_tokens
        self._bpe = self.tekken._model._core_bpe  # tiktoken's Rust core: the fastest path per text
        for name in ("bos", "eos", "pad", "inst", "inst_end", "vocab_size", "_offset"):
            if not isinstance(getattr(self, name), int):
                raise TypeError(f"its {name} is {getattr(self, name)!r}, not a token id")
        self._bpe.encode_ordinary("[INST] 두통 test")  # a vocabulary that cannot encode text fails here, not later

    @property
    def fingerprint(self) -> str:
        """Identifies tokenizer + template, for cache keys."""
        return f"{file_digest(str(self.path))}:{TEMPLATE_VERSION}"

    def _raw(self, text: str) -> list[int]:
        try:
            return self._bpe.encode_ordinary(text)
        except UnicodeEncodeError:  # lone surrogates: encode them as U+FFFD, as tiktoken does
            return self._bpe.encode_ordinary(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Plain text → token ids (no special tokens), as ``Tekkenizer.encode(text, False, False)``."""
        off = self._offset
        return [[t + off for t in self._raw(text)] for text in texts]

    def text_lengths(self, texts: list[str]) -> list[int]:
        return [len(self._raw(text)) for text in texts]

    def _user(self, ex: Example, i: int) -> str:
        user = ex.turns[i][0]
        if ex.system and i == len(ex.turns) - 1:
            return f"{ex.system}\n\n{user}"
        return user

    def encode(self, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
        """Each example → ``(prompt_ids, target_ids)``; the target ends with EOS."""
        texts = [t for ex in examples for i in range(len(ex.turns)) for t in (self._user(ex, i), ex.turns[i][1])]
        ids = iter(self.encode_texts(texts))
        out = []
        for ex in examples:
            prompt = [self.bos]
            for i in range(len(ex.turns)):
                user, answer = next(ids), next(ids)
                prompt += [self.inst, *user, self.inst_end]
                if i < len(ex.turns) - 1:
                    prompt += [*answer, self.eos]
                else:
                    out.append((prompt, [*answer, self.eos]))
        return out

    def encode_prompt(self, examples: list[Example]) -> list[list[int]]:
        """Prompt ids only, for generation."""
        return [p for p, _ in self.encode(examples)]

    def lengths(self, examples: list[Example]) -> tuple[list[int], list[int]]:
        """``(prompt_lengths, target_lengths)`` of the formatted examples, without building the ids."""
        texts = [t for ex in examples for i in range(len(ex.turns)) for t in (self._user(ex, i), ex.turns[i][1])]
        lens = iter(self.text_lengths(texts))
        prompts, targets = [], []
        for ex in examples:
            n = 1
            for i in range(len(ex.turns)):
                u, a = next(lens), next(lens)
                n += u + 2
                if i < len(ex.turns) - 1:
                    n += a + 1
                else:
                    prompts.append(n)
                    targets.append(a + 1)
        return prompts, targets

    def decode(self, ids: list[int]) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self.tekken.decode([i for i in ids if i >= self._offset], special_token_policy=SpecialTokenPolicy.IGNORE)


# ----------------------------------------------------------------------------- rows over --max_len
#
# The one rule, used by the worker's tokenisation (engine.worker.batching.tokenize) and by every data tool
# (analyze, audit, find-long, split) and preflight, so their counts are the trainer's:
#   * a row fits when prompt + target (answer + EOS) ≤ max_len tokens; otherwise it is over;
#   * --long drop: an over row is dropped;
#   * --long truncate: the answer is cut so that prompt + answer + EOS = max_len: the target keeps
#     max_len - prompt tokens and still ends with EOS (so a file that `voxtui data split` truncated trains
#     exactly as the worker truncates the original, and fits --max_len); the prompt is never cut, and a row
#     whose prompt leaves no room for one answer token and the EOS (prompt > max_len - 2) is dropped.

MIN_TRUNCATED_TARGET = 2  # one answer token and the EOS


def over_max_len(prompt_len, target_len, max_len: int):
    """Whether a row is longer than ``max_len`` (ints, or numpy arrays elementwise)."""
    return prompt_len + target_len > max_len


def kept_target_len(prompt_len, target_len, max_len: int, long: str):
    """The target tokens a row keeps under ``max_len`` and ``--long`` (``"truncate"`` or ``"drop"``):
    all of them when it fits, ``max_len - prompt_len`` when truncated, 0 when dropped. Takes ints (and
    returns an int) or numpy arrays (elementwise)."""
    if isinstance(prompt_len, int) and isinstance(target_len, int):  # one row: plain arithmetic, same rule
        if not over_max_len(prompt_len, target_len, max_len):
            return target_len
        room = max_len - prompt_len
        return room if long == "truncate" and room >= MIN_TRUNCATED_TARGET else 0
    import numpy as np

    room = max_len - np.asarray(prompt_len)
    cut = np.where(room >= MIN_TRUNCATED_TARGET, room, 0) if long == "truncate" else 0
    out = np.where(over_max_len(np.asarray(prompt_len), np.asarray(target_len), max_len), cut, target_len)
    return int(out) if np.ndim(out) == 0 else out.astype(np.int64)


def fit_target(prompt: list[int], target: list[int], max_len: int, long: str) -> list[int] | None:
    """``target`` as the row keeps it under ``max_len`` (the answer cut before its EOS when truncated),
    or None when the row is dropped."""
    keep = kept_target_len(len(prompt), len(target), max_len, long)
    if keep == 0:
        return None
    return target if keep == len(target) else [*target[:keep - 1], target[-1]]


def shortest_max_len(prompt_len: int, target_len: int, long: str) -> int:
    """The smallest ``--max_len`` under which a row is kept (whole with ``drop``, cut with ``truncate``)."""
    whole = prompt_len + target_len
    return whole if long == "drop" else min(whole, prompt_len + MIN_TRUNCATED_TARGET)


@lru_cache(maxsize=8)
def file_digest(path: str) -> str:
    """The first 16 hex digits of a file's SHA-256 (cached by path)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_format(model: str | os.PathLike | None = None) -> ChatFormat:
    """The template + tokenizer for ``model`` (see :func:`resolve_tokenizer_file`)."""
    return ChatFormat(resolve_tokenizer_file(model))
