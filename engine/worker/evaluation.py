"""Evaluation and previews during training: the validation loss over every rank, and preview generations
with the parameters in force, within their share of the training time (``--preview_budget``)."""

from __future__ import annotations

import contextlib
import math
import time

import msgspec

from engine.config import TrainConfig
from engine.protocol import MAX_NEW_TOKENS_MAX, Eval, Preview, PreviewStart, SetPreviewParams
from engine.worker.dist import Dist
from engine.worker.report import Report


class PreviewParams(msgspec.Struct, frozen=True):
    """The preview parameters in force: from the config, then ``set_preview_params`` commands, and a
    resumed run's checkpoint. Events and ``trainer_state.json`` carry them as ``to_dict()``."""

    temperature: float
    top_p: float
    max_new_tokens: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> PreviewParams:
        return cls(cfg.temperature, cfg.top_p, cfg.max_new_tokens)

    def updated(self, change: SetPreviewParams | dict) -> PreviewParams:
        """These parameters with those that ``change`` sets (a command's None, or a key a saved dict
        lacks, leaves one as it is)."""
        get = change.get if isinstance(change, dict) else lambda k: getattr(change, k)
        values = {k: get(k) for k in self.__struct_fields__ if get(k) is not None}
        return msgspec.structs.replace(self, **values)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


def preview_rows(cfg: TrainConfig, fmt) -> list[tuple[list[int], str, str]]:
    """(prompt ids, prompt text, reference) of the first --preview_count rows of --preview_file, or of
    --val_jsonl; none when previews are off (no file, or --preview_steps 0 outside the engine, where no
    "preview now" can come)."""
    from engine.rows import read_examples

    src = cfg.preview_file or cfg.val_jsonl
    if not src or cfg.preview_steps == 0 and not cfg.engine:
        return []
    out = []
    for _, ex in read_examples(src):
        (prompt, _), = fmt.encode([ex])
        out.append((prompt, ex.prompt_text, ex.target_text))
        if len(out) >= cfg.preview_count:
            break
    return out


class Previews:
    """Preview generations, spread over the ranks, and their time budget: a preview that comes due waits
    until the training since the last one pays for it within --preview_budget (both numbers come from
    collectives, so every rank gives the same answer)."""

    def __init__(self, rows: list, params: PreviewParams, cfg: TrainConfig, d: Dist, fmt, out: Report) -> None:
        self.rows, self.cfg, self.d, self.fmt, self.out = rows, cfg, d, fmt, out
        self.positions = 0  # the model's positions (0: not known yet): prompt + new tokens stay within them
        self._capped: tuple | None = None  # (asked, cap) said last
        self.params = params
        self.cost = 0.0  # seconds the last previews took (all ranks agree)
        self.since = 0.0  # training seconds since then (slowest rank)
        self.pending = False  # due, waiting for its budget
        self._score_failed = False  # a preview's ROUGE-L could not be computed (said once)
        # the fast decoder, kept from one preview to the next: its cache and captured graph are made once
        # and read the live adapter (the optimizer updates its weights in place) at every replay
        self._decoder = None

    @property
    def params(self) -> PreviewParams:
        """The preview parameters in force. Whatever sets them (the config, ``set_preview_params``, a resumed
        run's saved ones) is held to the protocol's limit and to the model's positions less the longest
        preview prompt: a longer max_new_tokens is cut to that, and said (the ack carries the cut value)."""
        return self._params

    @params.setter
    def params(self, value: PreviewParams) -> None:
        cap = self.most_new_tokens()
        if value.max_new_tokens > cap:
            if self._capped != (value.max_new_tokens, cap):
                longest = max((len(r[0]) for r in self.rows), default=0)
                why = (f"the model's {self.positions} positions less the longest preview prompt ({longest} tokens)"
                       if cap < MAX_NEW_TOKENS_MAX else f"the most a preview may generate ({MAX_NEW_TOKENS_MAX})")
                self.out.say(f"previews' max_new_tokens {value.max_new_tokens} cut to {cap}: {why}", level="warning")
            self._capped = (value.max_new_tokens, cap)
            value = msgspec.structs.replace(value, max_new_tokens=cap)
        self._params = value

    def most_new_tokens(self) -> int:
        """The most new tokens a preview may ask for: the protocol's limit, and (once the model is known)
        what its positions leave after the longest preview prompt (at least 1)."""
        cap = MAX_NEW_TOKENS_MAX
        if self.positions and self.rows:
            cap = min(cap, max(self.positions - max(len(r[0]) for r in self.rows), 1))
        return cap

    def limit_to(self, model) -> None:
        """The model's positions (its language model's ``max_position_embeddings``) bound the previews from
        now on."""
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config  # Voxtral: the language model's
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            self.positions = positions
            self.params = self._params

    def affordable(self) -> bool:
        b = self.cfg.preview_budget
        return b <= 0 or self.since * b >= self.cost

    def run_timed(self, model, step: int) -> None:
        """Previews now; what they cost starts the wait for the next (the first cost is said). The decoder's
        one-time set-up (compiling its step and capturing its graph, at the first preview or a new batch
        shape) is not a preview's cost: it is left out of the budget's wait."""
        t = time.perf_counter()
        before = self._setup()
        self.run(model, step)
        once = self._setup() - before
        cost, once = self.d.broadcast((max(time.perf_counter() - t - once, 0.0), once))
        cost, once = float(cost), float(once)
        budget = self.cfg.preview_budget
        if self.cost == 0.0 and budget > 0:
            setup = f" (and {once:.1f}s once, to compile and capture the decoder)" if once >= 0.05 else ""
            self.out.say(f"previews take {cost:.1f}s{setup}: with --preview_budget {budget:g} the next runs "
                         f"after at least {cost / budget:.0f}s of training")
        self.cost, self.since, self.pending = cost, 0.0, False

    def _setup(self) -> float:
        return self._decoder.setup_s if self._decoder is not None else 0.0

    def run(self, model, step: int) -> None:
        from engine.worker.decode import Decoder, generate, supported
        from engine.worker.modeling import eager

        if not self.rows:
            return
        d, p, fmt = self.d, self.params, self.fmt
        if d.main:  # training waits for these: readers can say so until their preview events come
            self.out.emit(PreviewStart(step=step, count=len(self.rows), max_new_tokens=int(p.max_new_tokens)))
        mine = list(range(d.rank, len(self.rows), d.world))  # spread over the ranks
        seed = self.cfg.seed + step
        texts = []
        if mine:
            inner = model.module if hasattr(model, "module") else model
            if self._decoder is None and supported(inner):
                # its step compiled on a GPU unless the run says --no-compile
                self._decoder = Decoder(inner, compile=None if self.cfg.compile else False)
            with eager():
                outs = generate(model, [self.rows[i][0] for i in mine], int(p.max_new_tokens), float(p.temperature),
                                float(p.top_p), seed, fmt.eos, fmt.pad, d.device, decoder=self._decoder)
            texts = [(i, fmt.decode(o)) for i, o in zip(mine, outs)]
        everything = d.gather(texts)
        if not d.main:
            return
        for rank, part in enumerate(everything):
            for i, text in part:
                _, prompt, reference = self.rows[i]
                self.out.emit(Preview(step=step, prompt=prompt, text=text, temperature=float(p.temperature),
                                      top_p=float(p.top_p), max_new_tokens=int(p.max_new_tokens), index=i,
                                      reference=reference, rank=rank, seed=seed,
                                      rougeL=self._score(text, reference) if reference else None))
                self.out.board.preview(i, prompt, text, step)

    def _score(self, text: str, reference: str) -> float | None:
        """A preview's ROUGE-L, best effort: a score that cannot be computed (rouge-score missing, say) is
        left out, once said, and never stops training."""
        from engine.eval.metrics import rouge_l

        try:
            return rouge_l(text, reference)
        except Exception as e:
            if not self._score_failed:
                self._score_failed = True
                self.out.say(f"previews go without ROUGE-L: {type(e).__name__}: {e}", level="warning")
            return None


class Evaluator:
    """The validation loss over every rank's share of the validation rows, and early stopping: the best
    loss so far, its step, and the evaluations since that did not improve on it (trainer_state.json keeps
    all three)."""

    def __init__(self, val_tok, cfg: TrainConfig, d: Dist, fmt, out: Report) -> None:
        self.val_tok, self.cfg, self.d, self.fmt, self.out = val_tok, cfg, d, fmt, out
        self.best_loss = math.inf
        self.best_step = 0
        self.bad_evals = 0

    @property
    def has_rows(self) -> bool:
        return self.val_tok is not None and len(self.val_tok) > 0

    @property
    def out_of_patience(self) -> bool:
        patience = self.cfg.early_stopping_patience
        return bool(patience) and self.bad_evals >= patience

    def run(self, loss_module, model, step: int, autocast=contextlib.nullcontext) -> bool:
        """Evaluates at ``step`` and says so (event, TensorBoard, log); returns whether the loss improved."""
        cfg = self.cfg
        loss, tokens = self.loss(loss_module, model, autocast)
        improved = loss < self.best_loss - cfg.early_stopping_min_delta
        if improved:
            self.best_loss, self.best_step, self.bad_evals = loss, step, 0
        else:
            self.bad_evals += 1
        patience_left = max(cfg.early_stopping_patience - self.bad_evals, 0) if cfg.early_stopping_patience else 0
        ppl = math.exp(min(loss, 50))
        self.out.emit(Eval(step=step, loss=loss, ppl=ppl, tokens=tokens, best_loss=self.best_loss,
                           best_step=self.best_step, improved=improved, patience_left=patience_left))
        self.out.board.eval(loss, step)
        self.out.log(f"eval step {step}: loss {loss:.4f} ppl {ppl:.2f}" + (" (best)" if improved else ""))
        return improved

    def loss(self, loss_module, model, autocast=contextlib.nullcontext) -> tuple[float, int]:
        """The token-weighted validation loss over every rank, and its token count (eagerly, without
        gradients; the model is back in training mode after)."""
        import torch

        from engine.worker.batching import collate
        from engine.worker.modeling import eager

        d, tok, bsz = self.d, self.val_tok, self.cfg.per_device_bsz
        idx = list(range(d.rank, len(tok), d.world))
        idx.sort(key=lambda i: -int(tok.lengths[i]))
        module = getattr(loss_module, "module", loss_module)  # under DDP, the module itself: no gradient hooks
        model.eval()
        loss_sum = 0.0
        tokens = 0
        with torch.no_grad(), eager():
            for i in range(0, len(idx), bsz):
                m = collate(tok, [[x] for x in idx[i:i + bsz]], self.fmt.pad, False)
                batch = {k: v.to(d.device) for k, v in m.items() if torch.is_tensor(v)}
                with autocast():
                    total, n = module(**batch)
                loss_sum += float(total)
                tokens += int(n)
        model.train()
        g = d.all_gather([loss_sum, tokens])
        return float(g[:, 0].sum()) / max(float(g[:, 1].sum()), 1.0), int(g[:, 1].sum())
