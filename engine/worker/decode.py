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
* On CUDA the step is **captured in a CUDA graph** for the batch's shape and replayed: one launch per
  token instead of hundreds (4-bit layers run eagerly: bitsandbytes' kernels are not captured).
* Rows sort by prompt length in the callers; prompt widths are rounded up to ``BUCKET`` so consecutive
  batches reuse one graph.

Greedy output is token for token that of HF ``generate`` in fp32 (tests/test_decode.py); in bf16 rows
differ only where two top logits are within rounding (bench/infer_speed.py reports how many). Sampling
(temperature, top-p) draws from a generator seeded by ``seed``: the same seed, the same text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BUCKET = 64  # prompt widths are rounded up to this, so batches of similar prompts share a captured graph
ATTENTIONS = ("sdpa", "efficient", "matmul")
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
    matrix products and a softmax in fp32, as transformers' eager attention)."""

    def __init__(self, model: nn.Module, graphs: bool | None = None, fuse: bool = True,
                 attention: str = ATTENTION) -> None:
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
        quantized = any(m.__class__.__name__ in ("Linear4bit", "Linear8bitLt") for m in self.lm.modules())
        self.graphs = (self.device.type == "cuda" and not quantized) if graphs is None else graphs
        self._key = None  # (batch, cache width) of the static state (and of the captured graph)
        self._graph = self._logits = None
        self._state: dict = {}
        self._fused = self._fuse() if fuse else []
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)} (got {attention!r})")
        self.attention = attention

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
        ids = torch.full((batch, width), pad, dtype=torch.long)
        att = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            att[i, width - len(p):] = 1
        ids, att = ids.to(self.device), att.to(self.device)
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
        pos = (att.cumsum(-1) - 1).clamp(min=0)  # what HF generate gives left-padded rows
        out = self.lm(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5.x / 4.5x
        if self._key is None or self._key[0] != batch or self._key[1] < width + max_new:
            self.release()
            total = -(-(width + max_new) // BUCKET) * BUCKET
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
        s = self._state
        for i in range(len(self.lm.layers)):
            k, v = _layer_kv(cache, i)
            s["k"][i][:, :, :width].copy_(k)
            s["v"][i][:, :, :width].copy_(v)
        # columns past the prompt hold what an earlier batch left (finite: it was computed); they are
        # masked until this batch writes them
        s["valid"].zero_()
        s["valid"][:, :width].copy_(att.bool())
        last = out.last_hidden_state[:, -1]
        del cache, out
        return self.head(last).float()

    def _step(self) -> torch.Tensor:
        """One token per row through the model; the logits of the next token (fp32)."""
        if not self.graphs:
            return self._forward().float()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._logits.float()

    def _capture(self) -> None:
        s = self._state
        # the warm-up and the capture write the cache at ``slot`` only: the first real step writes that
        # column again before anything reads it; the rest of the state is put back
        saved = {k: s[k].clone() for k in ("positions", "slot", "valid")}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (kernels chosen, workspaces allocated)
                self._forward()
                for k in ("positions", "slot", "valid"):
                    s[k].copy_(saved[k])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward()
        # the warm-up and the capture wrote through the state: put back what the next replay reads
        for k in ("positions", "slot", "valid"):
            s[k].copy_(saved[k])
        self._graph = graph

    def _forward(self) -> torch.Tensor:
        """The decoding step over the static state: reads tokens, positions, slot and valid; writes the
        new key/value at ``slot``, marks the column valid, advances positions and slot; returns the head's
        logits (batch × vocab) in the model's dtype. Few, large kernels: q/k/v (and gate/up) as one matrix
        product where the weights were fused, q and k rotated together, each norm one fused kernel."""
        s = self._state
        lm = self.lm
        batch, heads, kv, dim = s["tokens"].shape[0], self.heads, self.kv_heads, self.head_dim
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
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            qkv = self._qkv(i, attn, _rms_norm(layer.input_layernorm, x)).view(batch, 1, heads + 2 * kv, dim)
            qk = qkv[:, :, :heads + kv]
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)
            s["k"][i].index_copy_(2, slot, qk[:, :, heads:].transpose(1, 2).to(s["k"][i].dtype))
            s["v"][i].index_copy_(2, slot, qkv[:, :, heads + kv:].transpose(1, 2).to(s["v"][i].dtype))
            # one token per row: a key/value head's group of query heads attends as its query length
            q = qk[:, 0, :heads].reshape(batch, kv, heads // kv, dim).to(s["k"][i].dtype)
            o = self._attend(q, s["k"][i], s["v"][i], mask, attn.scaling)
            x = x + attn.o_proj(o.reshape(batch, 1, heads * dim))
            x = x + self._mlp(i, layer.mlp, _rms_norm(layer.post_attention_layernorm, x))
        s["positions"].add_(1)
        slot.add_(1)
        return self.head(_rms_norm(lm.norm, x)[:, 0])

    def _attend(self, q, k, v, mask, scale) -> torch.Tensor:
        if self.attention == "matmul":
            scores = torch.matmul(q * scale, k.transpose(-1, -2)).float() + mask
            return torch.matmul(scores.softmax(-1).to(v.dtype), v)
        if self.attention == "efficient" and q.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    def _qkv(self, i: int, attn, h: torch.Tensor) -> torch.Tensor:
        if self._fused:
            return F.linear(h, self._fused[i][0])
        return torch.cat((attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), dim=-1)

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
            if not all(type(m) is nn.Linear and m.bias is None for m in mods) or not hasattr(mlp, "act_fn"):
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


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm as transformers computes it (normalised in fp32, weight applied in the input's
    dtype), the normalisation as one fused kernel."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        return norm(x)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


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
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
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
