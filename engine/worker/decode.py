"""Fast decoding for ``voxtui infer`` and the training previews: a static KV cache, one decoding step
that is the same kernels every time, and on a GPU that step captured once in a CUDA graph and replayed.

Hugging Face ``generate`` on a PEFT model spends a decoding step mostly in Python: a dynamic cache that
grows by concatenation, a fresh mask and position tensors, the generation loop's checks, about twenty
small kernels per layer launched one by one. Reading the 3B model's weights once takes about 1.5 ms on
an H200; HF's step took 76.5 ms at batch 64 (docs/benchmarks.md). Here:

* **Prefill** is the model's own forward (the same kernels and masks HF's first step runs), with the
  positions HF gives left-padded rows; its keys and values are copied into a **static cache** of
  ``batch × kv heads × (prompt width + new tokens) × head dim`` per layer.
* **A decoding step** embeds one token per row, runs each layer's own norm and projection modules (so a
  plain, merged, PEFT-wrapped or 4-bit layer all work, and a live adapter is read as it is), rotates with
  the model's rotary embedding, writes the new key/value at one column of the cache (``index_copy_`` with
  a device tensor: no host value changes between steps) and attends over the whole cache with a mask that
  admits the row's real prompt columns and the columns generated so far. Grouped query heads attend as
  the query length of their key/value head (one token per row), so no key/value is repeated.
* Where every layer is a Llama layer (RMSNorms, SiLU MLP) whose projections are plain or PEFT LoRA
  linear layers, a layer's work before and after its attention are two functions over its tensors
  (``_attn_in``, ``_attn_out``; the adapters read live, q/k/v's adapters as two products instead of
  six). On CUDA both are **compiled** (``torch.compile``, one compiled region each, shared by the
  layers), so a layer's element-wise steps run as a few fused kernels.
* On CUDA the step is **captured in a CUDA graph** for the batch's shape and replayed: one launch per
  token instead of hundreds (4-bit layers run eagerly: bitsandbytes' kernels are not captured).
* Rows sort by prompt length in the callers; prompt widths are rounded up to ``BUCKET`` so consecutive
  batches reuse one graph.
* ``stream`` is **continuous batching** for ``voxtui infer``: a row that finishes takes the next prompt
  (prefilled into its place in a ring cache), so a batch never waits on its longest answer.

Greedy output is token for token that of HF ``generate`` in fp32 (tests/test_decode.py); in bf16 rows
differ only where two top logits are within rounding (bench/infer_speed.py reports how many). Sampling
(temperature, top-p) draws from a generator seeded by ``seed``: the same seed, the same text.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

BUCKET = 64  # prompt widths are rounded up to this, so batches of similar prompts share a captured graph
ATTENTIONS = ("sdpa", "efficient", "matmul")
RECOMPILES = 64  # compiled variants of the step's layer functions a process may make (batch sizes × dtypes)
ATTENTION = "sdpa"  # the default (bench/infer_speed.py measures the three on a GPU; docs/benchmarks.md)


def supported(model: nn.Module) -> bool:
    """A Llama/Mistral-shaped decoder the fast path knows (Voxtral's language model is one)."""
    from engine.worker.modeling import _unwrap, language_model

    try:
        lm = language_model(_unwrap(model))
    except ValueError:
        return False
    cfg = lm.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    return (hasattr(lm, "rotary_emb") and hasattr(lm, "layers") and not getattr(cfg, "attention_bias", False)
            and getattr(cfg, "sliding_window", None) is None and rope == "default"
            and all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in lm.layers))


class Decoder:
    """Decodes batches of prompts with ``model`` (a Voxtral, PEFT-wrapped or not). ``graphs``: capture
    the step in a CUDA graph (default: on CUDA, unless a layer is 4-bit). ``fuse``: where the layers are
    plain (merged) linear layers, fuse q/k/v and gate/up into single products (the weights are
    re-laid once, in place: no extra memory). ``attention``: how a step attends over the cache — "sdpa"
    (PyTorch's choice of kernel), "efficient" (SDPA's memory-efficient kernel), "matmul" (two batched
    matrix products and a softmax in fp32, as transformers' eager attention). ``compile``: torch.compile
    each layer's work before and after its attention (one compiled region each, shared by the layers;
    default: where the step is a CUDA graph, so the compiled kernels are replayed with it); a backend name
    ("aot_eager", "inductor") compiles with that backend."""

    def __init__(self, model: nn.Module, graphs: bool | None = None, fuse: bool = True,
                 attention: str = ATTENTION, compile: bool | str | None = None) -> None:
        from engine.worker.modeling import _unwrap, language_model

        self.model = model
        base = _unwrap(model)
        self.lm = language_model(base)
        self.head = base.get_output_embeddings()
        cfg = self.lm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = self.head.weight.device
        quantized = any(m.__class__.__name__ in ("Linear4bit", "Linear8bitLt") or hasattr(m, "_fp8_scale")
                        for m in self.lm.modules())
        self.graphs = (self.device.type == "cuda" and not quantized) if graphs is None else graphs
        self._key = None  # (batch, cache width) of the static state (and of the captured graph)
        self._graph = self._logits = None
        self.setup_s = 0.0  # seconds spent compiling the step and capturing its graphs (once per shape)
        self._warm = None  # the state's shape whose first (compiling) step ran, without graphs
        self._state: dict = {}
        self._fused = self._fuse() if fuse else []
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)} (got {attention!r})")
        self.attention = attention
        # the functional step (_attn_in / _attn_out over tensors) where every layer is a Llama layer with
        # RMSNorms and a SiLU MLP; else each layer's modules run as they are
        self._functional = all(
            type(getattr(layer.mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and hasattr(layer.input_layernorm, "variance_epsilon") for layer in self.lm.layers)
        if compile is None:
            compile = self.graphs
        self.compiled = bool(compile) and self._functional
        self._fns = (_attn_in, _attn_out)
        if self.compiled:
            import torch._dynamo

            # one compiled variant per batch size and dtype (a job has one or two; a test process many): room
            # for them before dynamo gives up on the function (it would raise, with fullgraph)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)
            backend = compile if isinstance(compile, str) else "inductor"
            self._fns = tuple(torch.compile(f, backend=backend, dynamic=False, fullgraph=True)
                              for f in (_attn_in, _attn_out))

    # ------------------------------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos: int | None = None, pad: int = 0, stop_at_eos: bool = True) -> list[list[int]]:
        """The continuation of each prompt (without the prompt, cut before ``eos``). Greedy at
        temperature 0, else sampled from the top-p nucleus of softmax(logits / temperature).
        ``stop_at_eos=False`` decodes ``max_new_tokens`` for every row (benchmarks)."""
        if not prompts or max_new_tokens <= 0:
            return [[] for _ in prompts]
        batch = len(prompts)
        width = -(-max(len(p) for p in prompts) // BUCKET) * BUCKET
        ids, att = (t.to(self.device) for t in _left_pad(prompts, width, pad))
        gen = torch.Generator(device=self.device).manual_seed(seed)

        logits = self._prefill(ids, att, max_new_tokens)
        out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        s = self._state
        s["positions"].copy_(att.sum(1))
        s["slot"].fill_(width)
        for t in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_p, gen)
            if eos is not None and stop_at_eos:
                nxt = nxt.masked_fill(finished, pad)
                finished |= nxt == eos
            out[:, t] = nxt
            if t + 1 == max_new_tokens:
                break
            # a host check every 16 tokens: a finished batch stops early without a sync per token
            if eos is not None and stop_at_eos and t % 16 == 15 and bool(finished.all()):
                break
            s["tokens"].copy_(nxt)
            logits = self._step()
        result = []
        for row in out.tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            result.append([tok for tok in row if tok != pad] if stop_at_eos else row)
        return result

    def release(self) -> None:
        """Forget the captured graph and the cache (their memory goes back to torch's allocator)."""
        self._graph = self._key = self._logits = None
        self._state = {}

    # ------------------------------------------------------------------------------------------ steps

    def _prefill(self, ids: torch.Tensor, att: torch.Tensor, max_new: int) -> torch.Tensor:
        """The prompts (left-padded, ``att`` marks the real tokens) through the model's own forward; their
        keys/values go to the static cache, which is kept (and its captured graph with it) while the batch
        size is the same and it has room for ``max_new`` more tokens. Returns the last position's logits."""
        batch, width = ids.shape
        cache, last = self._prompt_forward(ids, att)
        self._ensure(batch, width + max_new)
        s = self._state
        for i in range(len(self.lm.layers)):
            k, v = _layer_kv(cache, i)
            s["k"][i][:, :, :width].copy_(k)
            s["v"][i][:, :, :width].copy_(v)
        # columns past the prompt hold what an earlier batch left (finite: it was computed); they are
        # masked until this batch writes them
        s["valid"].zero_()
        s["valid"][:, :width].copy_(att.bool())
        del cache
        return self.head(last).float()

    def _prompt_forward(self, ids: torch.Tensor, att: torch.Tensor):
        """The model's own forward over left-padded prompts, with the positions HF generate gives them: its
        cache and the last position's hidden state."""
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5.x / 4.5x
        return cache, out.last_hidden_state[:, -1]

    def _ensure(self, batch: int, width: int) -> None:
        """A static state of ``batch`` rows with room for ``width`` columns (kept, with its graph, when the
        one there has the batch size and room enough)."""
        if self._key is not None and self._key[0] == batch and self._key[1] >= width:
            return
        self.release()
        total = -(-width // BUCKET) * BUCKET
        dtype = self.head.weight.dtype
        shape = (batch, self.kv_heads, total, self.head_dim)
        self._state = {
            "k": [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.lm.layers],
            "v": [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.lm.layers],
            "tokens": torch.zeros(batch, dtype=torch.long, device=self.device),
            "positions": torch.zeros(batch, dtype=torch.long, device=self.device),
            "slot": torch.zeros(1, dtype=torch.long, device=self.device),
            "valid": torch.zeros((batch, total), dtype=torch.bool, device=self.device),
        }
        self._key = (batch, total)

    # --------------------------------------------------------------------------- continuous batching

    @torch.no_grad()
    def stream(self, prompts: list[list[int]], max_new_tokens: int | list[int], batch: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, eos: int | None = None, pad: int = 0, check_every: int = 16):
        """Continuous batching: yields ``(index, tokens)`` for each prompt as its row finishes (at ``eos``,
        cut before it, or after ``max_new_tokens``), and a waiting prompt takes the row it leaves, so a
        batch never waits on its longest answer. ``batch`` rows decode together; every ``check_every``
        steps the host looks which rows finished (a finished row idles until then) and prefills the next
        prompts into them. Each row's tokens are those ``generate`` gives it alone (greedy; its attention
        sees only its own prompt and tokens). Sampling draws from one generator seeded by ``seed``: the
        same prompts, batch and seed, the same text. ``max_new_tokens``: one limit for all, or one per prompt.

        The cache is a ring of ``W`` columns per row: the step writes every row's new key/value at one
        shared column, ``slot``, which advances modulo ``W``; a prompt admitted while ``slot`` is at ``c``
        is written just before it (columns ``c - width … c - 1`` modulo ``W``), so its answer's columns
        follow it and never reach it (``W`` ≥ prompt width + ``max_new_tokens``). Rotary positions are
        each row's own, so where a row's columns lie changes nothing it computes."""
        n = len(prompts)
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        if len(limits) != n:
            raise ValueError(f"{len(limits)} limits for {n} prompts")
        if n == 0 or max(limits) <= 0:
            yield from ((i, []) for i in range(n))
            return
        max_new_tokens = max(limits)
        dev = self.device
        rows = max(1, min(batch, n))
        widest = -(-max(len(p) for p in prompts) // BUCKET) * BUCKET
        self._ensure(rows, widest + max_new_tokens)
        s = self._state
        total = self._key[1]
        s["valid"].zero_()
        s["slot"].zero_()
        slot = 0  # the host's copy of s["slot"]
        gen = torch.Generator(device=dev).manual_seed(seed)
        out = torch.full((rows, max_new_tokens + 1), pad, dtype=torch.long, device=dev)  # last column: idle rows
        count = torch.zeros(rows, dtype=torch.long, device=dev)
        limit = torch.ones(rows, dtype=torch.long, device=dev)
        finished = torch.ones(rows, dtype=torch.bool, device=dev)
        holder: list[int | None] = [None] * rows  # the prompt each row decodes
        waiting = iter(range(n))

        def admit(free: list[int]) -> None:
            taken = []
            for r in free:
                i = next(waiting, None)
                if i is None:
                    break
                holder[r] = i
                taken.append(r)
            if not taken:
                return
            zero = [r for r in taken if limits[holder[r]] <= 0]  # nothing to generate: finished at once
            if zero:
                finished[zero] = True
                count[zero] = 0
                taken = [r for r in taken if limits[holder[r]] > 0]
                if not taken:
                    return
            group = [prompts[holder[r]] for r in taken]
            width = -(-max(len(p) for p in group) // BUCKET) * BUCKET
            ids, att = (t.to(dev) for t in _left_pad(group, width, pad))
            cache, last = self._prompt_forward(ids, att)
            r = torch.tensor(taken, dtype=torch.long, device=dev)
            cols = (torch.arange(width, device=dev) + (slot - width)) % total
            for i in range(len(self.lm.layers)):
                k, v = _layer_kv(cache, i)  # (group, kv heads, width, dim)
                s["k"][i][r[:, None], :, cols[None, :]] = k.transpose(1, 2).to(s["k"][i].dtype)
                s["v"][i][r[:, None], :, cols[None, :]] = v.transpose(1, 2).to(s["v"][i].dtype)
            del cache
            s["valid"][r] = False
            s["valid"][r[:, None], cols[None, :]] = att.bool()
            s["positions"][r] = att.sum(1)
            first = self._pick(self.head(last).float(), temperature, top_p, gen)
            s["tokens"][r] = first
            out[r] = pad
            out[r, 0] = first
            count[r] = 1
            limit[r] = torch.tensor([limits[holder[t]] for t in taken], dtype=torch.long, device=dev)
            done = limit[r] <= 1
            if eos is not None:
                done |= first == eos
            finished[r] = done

        stats = self.stats = {"steps": 0, "admissions": 0}  # how the last stream went
        admit(list(range(rows)))
        ready: list[tuple[int, list[int]]] = []
        while True:
            busy = any(h is not None for h in holder)
            if busy:  # the next steps are queued on the GPU before the finished rows go to the caller
                stats["steps"] += check_every
                for _ in range(check_every):
                    nxt = self._pick(self._step(), temperature, top_p, gen)
                    slot = (slot + 1) % total
                    at = torch.where(finished, max_new_tokens, count)
                    out.scatter_(1, at[:, None], nxt[:, None])
                    count += ~finished
                    stop = count >= limit
                    if eos is not None:
                        stop |= nxt == eos
                    finished |= stop
                    s["tokens"].copy_(nxt)
            yield from ready  # while the GPU decodes
            ready = []
            if not busy:
                return
            done = [r for r, d in enumerate(finished.tolist()) if d and holder[r] is not None]  # waits for the GPU
            if done:
                idx = torch.tensor(done, dtype=torch.long, device=dev)
                for r, k, toks in zip(done, count[idx].tolist(), out[idx].tolist()):
                    toks = toks[:k]
                    if eos is not None and eos in toks:
                        toks = toks[:toks.index(eos)]
                    ready.append((holder[r], toks))
                    holder[r] = None
                stats["admissions"] += 1
                admit(done)

    def _step(self) -> torch.Tensor:
        """One token per row through the model; the logits of the next token (fp32)."""
        if not self.graphs:
            if not self.compiled or self._warm == self._key:
                return self._run().float()
            t0 = time.perf_counter()  # the first compiled step of a shape compiles it: set-up, not decoding
            logits = self._run().float()
            self._warm = self._key
            self.setup_s += time.perf_counter() - t0
            return logits
        if self._graph is None:
            t0 = time.perf_counter()  # compiling (on the host) and capturing: set-up, not decoding
            self._capture()
            self.setup_s += time.perf_counter() - t0
        self._graph.replay()
        return self._logits

    def _run(self) -> torch.Tensor:
        """``_forward`` with the compiled regions on (a caller's ``eager()`` stance is for the training's
        compiled layers, which the step never calls). A compile that fails (no Triton, an unsupported
        op) is said once and the step runs uncompiled: the same math."""
        if not self.compiled:
            return self._forward()
        try:
            with torch.compiler.set_stance("default"):
                return self._forward()
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the same math eagerly
            import warnings

            from engine.util import printable

            first = (str(e).splitlines() or [""])[0][:200]
            warnings.warn(printable(f"decoding without torch.compile: {type(e).__name__}: {first}"), stacklevel=2)
            self.compiled, self._fns = False, (_attn_in, _attn_out)
            self._restore()
            return self._forward()

    def _capture(self) -> None:
        s = self._state
        # the warm-up and the capture write the cache at ``slot`` only: the first real step writes that
        # column again before anything reads it; the rest of the state is put back
        self._saved = {k: s[k].clone() for k in ("positions", "slot", "valid")}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (compiled, kernels chosen, workspaces allocated)
                self._run()
                self._restore()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.compiler.set_stance("default"):
            self._logits = self._forward().float()
        # the warm-up and the capture wrote through the state: put back what the next replay reads
        self._restore()
        self._saved = None
        self._graph = graph

    def _restore(self) -> None:
        saved = getattr(self, "_saved", None)
        if saved:
            for k, v in saved.items():
                self._state[k].copy_(v)

    def _forward(self) -> torch.Tensor:
        """The decoding step over the static state: reads tokens, positions, slot and valid; writes the
        new key/value at ``slot``, marks the column valid, advances positions and slot; returns the head's
        logits (batch × vocab) in the model's dtype. Few, large kernels: q/k/v (and gate/up) as one matrix
        product where the weights were fused, q and k rotated together, each norm one fused kernel; with
        ``compile``, each layer's work before and after the attention is one compiled region each (the
        layers share it), so its element-wise steps run as a few fused kernels."""
        s = self._state
        lm = self.lm
        heads, kv, dim = self.heads, self.kv_heads, self.head_dim
        slot = s["slot"]
        s["valid"].index_fill_(1, slot, True)
        x = lm.embed_tokens(s["tokens"][:, None])
        cos, sin = lm.rotary_emb(x, s["positions"][:, None])
        # rotate_half(x) is roll(x, half) with the first half negated: the sign goes into sin, once per step
        half = dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (batch, 1, 1, head_dim): over (batch, 1, heads, head_dim)
        mask = torch.zeros(s["valid"].shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~s["valid"], float("-inf"))[:, None, None, :]
        plans = self._plans()
        attn_in, attn_out = self._fns
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            kc, vc = s["k"][i], s["v"][i]
            if plans is not None:
                eps, ln1, qkv, wo, ln2, gate_up, down = plans[i]
                q, k, v = attn_in(x, ln1, qkv, cos, sin, eps, heads, kv, dim, kc.dtype)
            else:
                q, k, v = _attn_in_modules(self, i, layer, x, cos, sin, kc.dtype)
            kc.index_copy_(2, slot, k)
            vc.index_copy_(2, slot, v)
            o = self._attend(q, kc, vc, mask, attn.scaling)
            if plans is not None:
                x = attn_out(x, o, wo, ln2, gate_up, down, eps)
            else:
                x = x + attn.o_proj(o.reshape(x.shape[0], 1, heads * dim))
                x = x + self._mlp(i, layer.mlp, _rms_norm(layer.post_attention_layernorm, x))
        s["positions"].add_(1)
        slot.add_(1).remainder_(s["valid"].shape[1])
        return self.head(_rms_norm(lm.norm, x)[:, 0])

    def _plans(self) -> list | None:
        """Per layer, the tensors of the functional step (``_attn_in`` / ``_attn_out``): the norms' weights
        and, per projection, its weight and its live adapters (``_linear_plan``); None where a layer is
        not one it knows (4-bit, DoRA, another norm or activation: the modules run as they are). Read from
        the modules whenever the step runs outside a graph or is captured; a captured graph reads the
        tensors it was captured with, so weights change in place (the optimizer's steps, a checkpoint swap)."""
        if not self._functional:
            return None
        plans = []
        for i, layer in enumerate(self.lm.layers):
            attn, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            eps = getattr(ln1, "variance_epsilon", None)
            if eps is None or getattr(ln2, "variance_epsilon", None) != eps:
                return None
            if self._fused:
                qkv, gate_up = ((self._fused[i][0], ()),), ((self._fused[i][1], ()),)
            else:
                qkv = tuple(_linear_plan(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
                gate_up = tuple(_linear_plan(getattr(mlp, n)) for n in ("gate_proj", "up_proj"))
            wo, down = _linear_plan(attn.o_proj), _linear_plan(mlp.down_proj)
            if any(p is None for p in (*qkv, *gate_up, wo, down)):
                return None
            plans.append((eps, ln1.weight, qkv, wo, ln2.weight, gate_up, down))
        return plans

    def _attend(self, q, k, v, mask, scale) -> torch.Tensor:
        if self.attention == "matmul":
            scores = torch.matmul(q * scale, k.transpose(-1, -2)).float() + mask
            return torch.matmul(scores.softmax(-1).to(v.dtype), v)
        if self.attention == "efficient" and q.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def _mlp(self, i: int, mlp, h: torch.Tensor) -> torch.Tensor:
        if self._fused:
            gate, up = F.linear(h, self._fused[i][1]).chunk(2, dim=-1)
            return mlp.down_proj(mlp.act_fn(gate) * up)
        return mlp(h)

    def _fuse(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For plain linear layers (a merged or base model; not a PEFT one, whose adapters must be read live):
        q/k/v and gate/up weights concatenated into one tensor each, the modules' weights made views into
        it (no second copy of the weights; a later in-place change of a module's weight, as a checkpoint
        swap makes, is seen by the fused product). Empty when a layer is not plain."""
        fused = []
        for layer in self.lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj")))
            mods = [getattr(owner, n, None) for owner, names in groups for n in names]
            if not all(type(m) is nn.Linear and m.bias is None and not hasattr(m, "_fp8_scale") for m in mods) \
                    or not hasattr(mlp, "act_fn"):
                return []
        cached = getattr(self.lm, "_voxtui_fused", None)  # fused by an earlier decoder of this model
        if cached is not None:
            return cached
        with torch.no_grad():
            for layer in self.lm.layers:
                pair = []
                for owner, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                     (layer.mlp, ("gate_proj", "up_proj"))):
                    mods = [getattr(owner, n) for n in names]
                    whole = torch.cat([m.weight.detach() for m in mods])
                    start = 0
                    for m in mods:
                        rows = m.weight.shape[0]
                        m.weight = nn.Parameter(whole[start:start + rows], requires_grad=False)
                        start += rows
                    pair.append(whole)
                fused.append(tuple(pair))
        self.lm._voxtui_fused = fused
        return fused

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token once the tokens before it already hold top_p (the first is always kept)
            drop = probs.cumsum(-1) - probs > top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def _linear_plan(m: nn.Module) -> tuple | None:
    """A projection as tensors: ``(weight, ((lora_A, lora_B, scale), ...))`` for a plain linear layer (no
    adapters) or a PEFT LoRA layer (its active vanilla adapters, read live); None for anything else (a 4-bit,
    FP8 or biased layer, DoRA, an adapter in training mode with dropout)."""
    if type(m) is nn.Linear:
        return (m.weight, ()) if m.bias is None and not hasattr(m, "_fp8_scale") else None
    base = getattr(m, "base_layer", None)
    if type(base) is not nn.Linear or base.bias is not None or not hasattr(m, "lora_A") or hasattr(base, "_fp8_scale"):
        return None
    if getattr(m, "disable_adapters", False) or not getattr(m, "cast_input_dtype_enabled", True):
        return None
    if getattr(m, "merged", False):
        return (base.weight, ())
    adapters = []
    for name in m.active_adapters:
        if name not in m.lora_A.keys():
            continue
        a, b = m.lora_A[name], m.lora_B[name]
        dropout = m.lora_dropout[name]
        if (name in getattr(m, "lora_variant", {}) or type(a) is not nn.Linear or type(b) is not nn.Linear
                or a.bias is not None or b.bias is not None
                or not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and not dropout.training))):
            return None
        adapters.append((a.weight, b.weight, float(m.scaling[name])))
    return (base.weight, tuple(adapters))


def _linear(x: torch.Tensor, plan: tuple) -> torch.Tensor:
    """``plan``'s projection of ``x``, as PEFT's LoRA layer computes it: the base product, then each adapter's
    ``B(A(x)) · scale`` added (``x`` cast to the adapter's dtype), the sum in the base product's dtype."""
    weight, adapters = plan
    y = F.linear(x, weight)
    if not adapters:
        return y
    dtype = y.dtype
    for a, b, scale in adapters:
        x = x if x.dtype == a.dtype else x.to(a.dtype)
        y = y + F.linear(F.linear(x, a), b) * scale
    return y.to(dtype)


def _linears(x: torch.Tensor, plans: tuple) -> list[torch.Tensor]:
    """Several projections of the same ``x`` (q/k/v, gate/up). Where each has one adapter, of one dtype,
    their adapters run as two products instead of two each: ``x`` times the A matrices stacked, then times
    the B matrices laid block-diagonally (the zeros add nothing to any sum); each projection's part is
    scaled and added to its base product as PEFT does."""
    bases = [F.linear(x, w) for w, _ in plans]
    if len(plans) < 2 or any(len(a) != 1 for _, a in plans) or len({a[0][0].dtype for _, a in plans}) != 1:
        return [_linear(x, p) if p[1] else y for p, y in zip(plans, bases)]
    a_dtype = plans[0][1][0][0].dtype
    xa = x if x.dtype == a_dtype else x.to(a_dtype)
    u = F.linear(xa, torch.cat([a[0][0] for _, a in plans]))
    lora = F.linear(u, torch.block_diag(*[a[0][1] for _, a in plans]))
    out, start = [], 0
    for (_, a), y in zip(plans, bases):
        width = y.shape[-1]
        out.append((y + lora[..., start:start + width] * a[0][2]).to(y.dtype))
        start += width
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it: normalised in fp32, the weight applied in ``x``'s dtype."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _attn_in(x, ln, qkv, cos, sin, eps: float, heads: int, kv: int, dim: int, dtype):
    """A layer's work before its attention, one token per row: norm, q/k/v products, q and k rotated.
    Returns q as ``(batch, kv heads, query heads per kv head, dim)`` (a key/value head's group of query
    heads attends as its query length: no key/value repeated) and the new k, v as ``(batch, kv heads, 1,
    dim)``, all in the cache's ``dtype``."""
    h = _rms(x, ln, eps)
    parts = _linears(h, qkv)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return _rotate_split(out, cos, sin, heads, kv, dim, dtype)


def _rotate_split(out, cos, sin, heads: int, kv: int, dim: int, dtype):
    """The q/k/v products of one token per row: q and k rotated, then q as ``(batch, kv heads, query heads
    per kv head, dim)`` and k, v as ``(batch, kv heads, 1, dim)``, in ``dtype``."""
    batch = out.shape[0]
    out = out.view(batch, 1, heads + 2 * kv, dim)
    qk = out[:, :, :heads + kv]
    # rotate_half(t) = roll(t, half) with its first half negated; that sign is already in sin
    qk = torch.addcmul(qk * cos, qk.roll(dim // 2, dims=-1), sin)
    q = qk[:, 0, :heads].reshape(batch, kv, heads // kv, dim).to(dtype)
    k = qk[:, :, heads:].transpose(1, 2).to(dtype)
    v = out[:, :, heads + kv:].transpose(1, 2).to(dtype)
    return q, k, v


def _attn_out(x, o, wo, ln, gate_up, down, eps: float):
    """A layer's work after its attention: the output product and residual, norm, the SiLU-gated MLP and
    its residual."""
    batch = x.shape[0]
    x = x + _linear(o.reshape(batch, 1, -1).to(x.dtype), wo)
    h = _rms(x, ln, eps)
    parts = _linears(h, gate_up)
    gate, up = parts[0].chunk(2, dim=-1) if len(parts) == 1 else parts
    return x + _linear(F.silu(gate) * up, down)


def _attn_in_modules(dec: Decoder, i: int, layer: nn.Module, x, cos, sin, dtype):
    """``_attn_in`` through the layer's own modules (a layer the functional step does not know)."""
    attn = layer.self_attn
    h = _rms_norm(layer.input_layernorm, x)
    if dec._fused:
        out = F.linear(h, dec._fused[i][0])
    else:
        out = torch.cat((attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), dim=-1)
    return _rotate_split(out, cos, sin, dec.heads, dec.kv_heads, dec.head_dim, dtype)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm as transformers computes it (normalised in fp32, weight applied in the input's
    dtype), the normalisation as one fused kernel."""
    eps = getattr(norm, "variance_epsilon", None)
    return norm(x) if eps is None else _rms(x, norm.weight, eps)


def _left_pad(prompts: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` right-aligned in rows of ``width`` (ids, and the mask of their real tokens), on the CPU."""
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            att[i, width - len(p):] = 1
    return ids, att


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s keys and values of a transformers cache (5.x ``layers[i].keys``; older tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache[i][0], cache[i][1]


def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
             seed: int, eos: int, pad: int, device: torch.device, decoder=None) -> list[list[int]]:
    """Sampled (or greedy at temperature 0) continuations of each prompt, with the fast decoder
    (``Decoder``: static cache, CUDA graph) where the model is one it knows, else HF
    ``generate``. Pass a ``decoder`` to keep its captured graph between batches. The process's random
    state is left as it was (previews never disturb training)."""
    peft = model.module if hasattr(model, "module") else model
    was_training = peft.training
    peft.eval()
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        if decoder is None and supported(peft):
            decoder = Decoder(peft)
        if decoder is not None:
            return decoder.generate(prompts, max_new_tokens, temperature, top_p, seed, eos, pad)
        return generate_hf(peft, prompts, max_new_tokens, temperature, top_p, seed, eos, pad, device)
    finally:
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        if was_training:
            peft.train()


@torch.no_grad()
def generate_hf(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                seed: int, eos: int, pad: int, device: torch.device, stop_at_eos: bool = True) -> list[list[int]]:
    """HF ``generate`` on left-padded prompts (what voxtui used before the fast decoder; the reference
    its tests and bench/infer_speed.py compare against). ``stop_at_eos=False``: every row runs
    ``max_new_tokens``."""
    width = max(len(p) for p in prompts)
    ids, att = _left_pad(prompts, width, pad)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad, "use_cache": True}
    if stop_at_eos:
        kwargs["eos_token_id"] = eos
    else:
        kwargs.update(eos_token_id=None, min_new_tokens=max_new_tokens)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs)
    result = []
    for row in out[:, width:].tolist():
        if stop_at_eos:
            if eos in row:
                row = row[:row.index(eos)]
            row = [t for t in row if t != pad]
        result.append(row)
    return result
