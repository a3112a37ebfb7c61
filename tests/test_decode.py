"""The fast decoder (engine/worker/decode.py) against HF ``generate``, in fp32 on the tiny model: greedy
output token for token equal, on the PEFT model and merged; sampling reproducible; nothing else changed."""

import pytest
import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EOS, PAD = 2, 11


@pytest.fixture(scope="session")  # built once a test process, however the modules interleave
def peft_model(tiny_model, tmp_path_factory):
    """The tiny Voxtral with a LoRA adapter whose B is not zero (a trained adapter changes the output),
    and that adapter saved the way the worker saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import VoxtralForConditionalGeneration

    from engine.worker.modeling import _drop_audio_tower, lora_target_regex

    base = VoxtralForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    _drop_audio_tower(base)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_regex(TARGETS)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    saved = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(saved)
    return model, saved


def prompts(n=9, seed=1, longest=90):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, longest] + torch.randint(2, longest, (n - 2,), generator=g).tolist()
    return [torch.randint(100, 131000, (k,), generator=g).tolist() for k in lengths]


def test_greedy_equals_hf_generate_on_the_peft_model(peft_model):
    from engine.worker.decode import Decoder, generate_hf

    model, _ = peft_model
    p = prompts()
    ref = generate_hf(model, p, 40, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"))
    decoder = Decoder(model)
    assert decoder.generate(p, 40, eos=EOS, pad=PAD) == ref
    # the same decoder again, other widths and batch sizes (its static state is rebuilt as needed)
    q = prompts(3, seed=5, longest=150)
    assert decoder.generate(q, 17, eos=EOS, pad=PAD) == generate_hf(model, q, 17, 0.0, 1.0, 0, EOS, PAD,
                                                                    torch.device("cpu"))
    # every row runs max_new_tokens when told not to stop
    full = decoder.generate(p, 25, eos=EOS, pad=PAD, stop_at_eos=False)
    assert [len(r) for r in full] == [25] * len(p)
    assert full == generate_hf(model, p, 25, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"), stop_at_eos=False)


@pytest.mark.parametrize("attention", ["efficient", "matmul"])
def test_every_attention_variant_decodes_hf_tokens(peft_model, attention):
    from engine.worker.decode import Decoder, generate_hf

    model, _ = peft_model
    p = prompts(5)
    assert Decoder(model, attention=attention).generate(p, 16, eos=EOS, pad=PAD) == generate_hf(
        model, p, 16, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"))
    with pytest.raises(ValueError, match="attention must be one of"):
        Decoder(model, attention="flash")


def test_rows_stop_at_eos_like_hf(peft_model):
    """A prompt that ends where the model says EOS right away: the row is empty; the others go on."""
    from engine.worker.decode import Decoder, generate_hf

    model, _ = peft_model
    p = prompts(6, seed=3)
    first = Decoder(model).generate(p, 8, eos=None, pad=PAD, stop_at_eos=False)
    # call the first token each row produces its EOS: that row must come back empty, the others not
    eos = first[0][0]
    got = Decoder(model).generate(p, 8, eos=eos, pad=PAD)
    assert got[0] == [] and got == generate_hf(model, p, 8, 0.0, 1.0, 0, eos, PAD, torch.device("cpu"))


def test_merged_checkpoint_equals_peft_from_pretrained(peft_model, tiny_model):
    """voxtui infer's model (the adapter merged into the base) decodes what HF generate on
    ``PeftModel.from_pretrained`` of the saved adapter decodes; a second adapter swaps in exactly."""
    from peft import PeftModel
    from transformers import VoxtralForConditionalGeneration

    from engine.config import TrainConfig
    from engine.eval.loading import MergedModel
    from engine.worker.decode import Decoder, generate_hf

    _, saved = peft_model
    cfg = TrainConfig(model_id=str(tiny_model), train_jsonl="-", bf16=False, quant="none")
    merged = MergedModel(cfg, torch.device("cpu"), swappable=True).use(saved)
    ref = PeftModel.from_pretrained(VoxtralForConditionalGeneration.from_pretrained(tiny_model), saved).eval()
    p = prompts()
    expected = generate_hf(ref, p, 30, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"))
    assert Decoder(merged.model).generate(p, 30, eos=EOS, pad=PAD) == expected
    ids = torch.tensor([p[1]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    # another checkpoint (this one with B zero: the base itself), then back: the weights as loaded each time
    zero = saved.parent / "zero"
    zero.mkdir(exist_ok=True)
    (zero / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "adapter_model.safetensors")
    save_file({k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in tensors.items()},
              zero / "adapter_model.safetensors")
    plain = VoxtralForConditionalGeneration.from_pretrained(tiny_model).eval()
    merged.use(zero)
    for name, w in plain.named_parameters():
        if "audio_tower" not in name:
            assert torch.equal(merged.model.get_parameter(name), w), name
    merged.use(saved)
    assert Decoder(merged.model).generate(p, 30, eos=EOS, pad=PAD) == expected


def test_nf4_run_decodes_on_its_own_4bit_base(peft_model, tiny_model):
    """An NF4 run: the merged model holds the 4-bit base expanded once (the values bitsandbytes
    multiplies by), the adapter merged; its logits are those of the 4-bit base + adapter (PEFT, un-merged)
    within the precision of bitsandbytes' CPU kernel (bf16), and the fast decoder on it decodes what HF
    generate on it decodes."""
    import bitsandbytes.functional as bnbf
    from peft import PeftModel

    from engine.config import TrainConfig
    from engine.eval.loading import MergedModel, load_base
    from engine.worker.decode import Decoder, generate_hf

    _, saved = peft_model
    cfg = TrainConfig(model_id=str(tiny_model), train_jsonl="-", bf16=False, quant="nf4")
    merged = MergedModel(cfg, torch.device("cpu"))
    assert merged.dequantized >= 2 * 7  # the 7 projections of both layers (and the projector's, unused by text)
    assert not any(m.__class__.__name__ == "Linear4bit" for m in merged.model.modules())
    four_bit = load_base(cfg, torch.device("cpu"))
    name = "model.language_model.layers.1.mlp.down_proj"
    q = four_bit.get_submodule(name).weight
    assert torch.equal(merged.model.get_submodule(name).weight, bnbf.dequantize_4bit(q.data, q.quant_state))
    merged.use(saved)
    ref = PeftModel.from_pretrained(four_bit, saved).eval()
    p = prompts(6)
    with torch.no_grad():
        ids = torch.tensor([p[1]])
        a, b = merged.model(input_ids=ids).logits, ref(input_ids=ids).logits
        assert (a - b).abs().max() < 0.03 * b.abs().max()
    assert Decoder(merged.model).generate(p, 20, eos=EOS, pad=PAD) == generate_hf(
        merged.model, p, 20, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"))


def test_sampling_is_reproducible_and_leaves_the_rng_alone(peft_model):
    from engine.worker.decode import Decoder, generate

    model, _ = peft_model
    p = prompts(5)
    d = Decoder(model)
    a = d.generate(p, 8, 0.9, 0.95, seed=7, eos=EOS, pad=PAD)
    assert a == d.generate(p, 8, 0.9, 0.95, seed=7, eos=EOS, pad=PAD)
    assert a != d.generate(p, 8, 0.9, 0.95, seed=8, eos=EOS, pad=PAD)
    # a nucleus that holds only the top token is greedy decoding
    assert d.generate(p, 8, 1.0, 1e-6, seed=7, eos=EOS, pad=PAD) == d.generate(p, 8, eos=EOS, pad=PAD)
    state = torch.random.get_rng_state()
    generate(model, p, 4, 0.8, 0.9, 3, EOS, PAD, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training is False


def test_bad_adapters_are_refused_in_one_line(peft_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from engine.eval.loading import read_adapter
    from engine.util import UsageError

    _, saved = peft_model
    scale, pairs = read_adapter(saved)
    assert scale == 2.0 and len(pairs) == 2 * 7  # the tiny model's 2 layers × 7 projections
    tensors = load_file(saved / "adapter_model.safetensors")
    cases = {
        "half": ({k: v for k, v in tensors.items() if "lora_B" not in k}, None, "only one of lora_A / lora_B"),
        "extra": ({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, None, "unexpected tensor"),
        "config": (tensors, "{not json", "cannot read r and lora_alpha"),
        "dora": (tensors, '{"r": 16, "lora_alpha": 32, "use_dora": true}', "DoRA"),
    }
    for name, (ts, conf, said) in cases.items():
        d = tmp_path / name
        d.mkdir()
        save_file(ts, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(conf or (saved / "adapter_config.json").read_text())
        with pytest.raises(UsageError, match=said):
            read_adapter(d)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    (tmp_path / "torn" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(UsageError, match="cannot read it"):
        read_adapter(tmp_path / "torn")


def test_the_functional_step_and_the_modules_path_both_decode_hf_tokens(peft_model):
    """The step runs as functions over the layers' tensors (what is compiled on a GPU) on the PEFT model,
    reading its live adapters; a layer it does not know runs its modules: both give HF's tokens."""
    from engine.worker.decode import Decoder, generate_hf

    model, _ = peft_model
    p = prompts(5)
    ref = generate_hf(model, p, 16, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"))
    functional = Decoder(model)
    assert functional._plans() is not None and len(functional._plans()) == len(functional.lm.layers)
    assert all(len(proj[1]) == 1 for proj in functional._plans()[0][2])  # q, k, v: each its adapter
    assert functional.generate(p, 16, eos=EOS, pad=PAD) == ref
    modules = Decoder(model)
    modules._functional = False
    assert modules._plans() is None
    assert modules.generate(p, 16, eos=EOS, pad=PAD) == ref


def test_the_compiled_step_decodes_hf_tokens_and_reads_the_live_adapter(peft_model):
    """torch.compile over the step's layer functions (aot_eager here: the same graphs Inductor gets, without
    a C++ build on the CPU): HF's tokens, also inside the training's eager() stance, and a change of the
    adapter's weights in place (what the optimizer does) is seen by the next generation."""
    from engine.worker.decode import Decoder, generate_hf
    from engine.worker.modeling import eager

    model, _ = peft_model
    p = prompts(4)
    decoder = Decoder(model, compile="aot_eager")
    assert decoder.compiled
    with eager():
        assert decoder.generate(p, 12, eos=EOS, pad=PAD) == generate_hf(model, p, 12, 0.0, 1.0, 0, EOS, PAD,
                                                                        torch.device("cpu"))
    b = next(w for n, w in model.named_parameters() if "lora_B" in n and "v_proj" in n)
    saved = b.detach().clone()
    try:
        with torch.no_grad():
            for n, w in model.named_parameters():
                if "lora_B" in n:
                    w.mul_(-3.0)
        new_ref = generate_hf(model, p, 12, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"))
        assert decoder.generate(p, 12, eos=EOS, pad=PAD) == new_ref
    finally:
        with torch.no_grad():
            for n, w in model.named_parameters():
                if "lora_B" in n:
                    w.div_(-3.0)
    assert torch.allclose(b, saved)
    # a compiled variant per batch size: more than dynamo's default of 8 and the step stays compiled
    for n in range(1, 11):
        assert decoder.generate(prompts(12, seed=n, longest=20)[:n], 2, eos=EOS, pad=PAD, stop_at_eos=False)
    assert decoder.compiled


def test_a_compiler_that_fails_falls_back_to_the_same_math(peft_model):
    from torch._dynamo import list_backends, register_backend

    from engine.worker.decode import Decoder, generate_hf

    if "voxtui_failing" not in list_backends(exclude_tags=()):
        @register_backend(name="voxtui_failing")
        def failing(gm, example_inputs):
            raise RuntimeError("this compiler always fails")

    model, _ = peft_model
    p = prompts(3)
    decoder = Decoder(model, compile="voxtui_failing")
    with pytest.warns(UserWarning, match="decoding without torch.compile"):
        out = decoder.generate(p, 8, eos=EOS, pad=PAD)
    assert not decoder.compiled
    assert out == generate_hf(model, p, 8, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"))


def test_continuous_batching_gives_each_row_its_hf_tokens(peft_model, monkeypatch):
    """``stream``: 11 prompts through 3 rows; rows stop at EOS at different steps and waiting prompts take
    their places (the ring cache wraps several times): each prompt's tokens are HF generate's for it."""
    from engine.worker.decode import Decoder, generate_hf

    model, _ = peft_model
    p = prompts(11, seed=7, longest=50)
    decoder = Decoder(model)
    free = decoder.generate(p, 24, eos=EOS, pad=PAD, stop_at_eos=False)
    # an "EOS" that rows meet at their own steps (some never): rows finish early, at different times
    firsts = lambda t: {r.index(t) for r in free if t in r}  # noqa: E731
    eos = max({t for r in free for t in r}, key=lambda t: len(firsts(t)))
    ref = [generate_hf(model, [q], 24, 0.0, 1.0, 0, eos, PAD, torch.device("cpu"))[0] for q in p]
    assert len({len(r) for r in ref}) > 2 and any(len(r) < 24 for r in ref)
    got = dict(decoder.stream(p, 24, batch=3, eos=eos, pad=PAD, check_every=4))
    assert sorted(got) == list(range(len(p)))
    assert [got[i] for i in range(len(p))] == ref
    # two rows and a narrow ring (widths rounded to 16): the shared column goes round it more than once
    monkeypatch.setattr("engine.worker.decode.BUCKET", 16)
    steps = []
    step = decoder._step
    decoder._step = lambda: steps.append(1) or step()
    got = dict(decoder.stream(p * 2, 24, batch=2, eos=eos, pad=PAD, check_every=3))
    del decoder._step
    assert [got[i] for i in range(2 * len(p))] == ref * 2
    assert len(steps) > 1.5 * decoder._key[1], (len(steps), decoder._key)
    monkeypatch.undo()
    # every row runs max_new_tokens when there is no EOS; one row only; more rows than prompts
    assert dict(decoder.stream(p[:4], 9, batch=1, pad=PAD)) == dict(enumerate(
        generate_hf(model, [q], 9, 0.0, 1.0, 0, EOS, PAD, torch.device("cpu"), stop_at_eos=False)[0] for q in p[:4]))
    assert dict(decoder.stream(p[:2], 5, batch=8, eos=eos, pad=PAD)) == {0: ref[0][:5], 1: ref[1][:5]}
    assert list(decoder.stream([], 5, batch=4)) == [] and dict(decoder.stream(p[:2], 0, batch=4)) == {0: [], 1: []}
    # a limit per prompt (0 included): each row its own number of HF's tokens
    limits = [3, 0, 11, 1, 7, 24, 2]
    got = dict(decoder.stream(p[:7], limits, batch=3, pad=PAD, check_every=2))
    assert got == {i: ref_free[:k] for i, (k, ref_free) in enumerate(zip(limits, free))}
    with pytest.raises(ValueError, match="2 limits for 3 prompts"):
        list(decoder.stream(p[:3], [1, 2], batch=2))


def test_continuous_batching_samples_reproducibly(peft_model):
    from engine.worker.decode import Decoder

    model, _ = peft_model
    p = prompts(5, seed=8, longest=40)
    decoder = Decoder(model)
    a = dict(decoder.stream(p, 8, batch=2, temperature=0.9, top_p=0.9, seed=3, eos=EOS, pad=PAD))
    assert a == dict(Decoder(model).stream(p, 8, batch=2, temperature=0.9, top_p=0.9, seed=3, eos=EOS, pad=PAD))
    assert a != dict(decoder.stream(p, 8, batch=2, temperature=0.9, top_p=0.9, seed=4, eos=EOS, pad=PAD))


def test_a_previews_cost_leaves_out_the_decoders_one_time_setup(peft_model, fmt, capsys):
    """The preview budget waits on what previews cost, not on the decoder's compile (and, on a GPU, graph
    capture) at the first preview: that is said apart, once, and left out."""
    import time

    import torch._dynamo

    from engine.config import TrainConfig
    from engine.worker.decode import Decoder
    from engine.worker.dist import Dist
    from engine.worker.evaluation import PreviewParams, Previews
    from engine.worker.report import Report

    torch._dynamo.reset()  # what this process compiled before (another test's decoder) is not reused
    model, _ = peft_model
    rows = [(p, f"prompt {i}", "") for i, p in enumerate(prompts(3, seed=9, longest=30))]
    cfg = TrainConfig(model_id="tiny", train_jsonl="-", preview_budget=0.5, max_new_tokens=6)
    previews = Previews(rows, PreviewParams.of(cfg), cfg, Dist(), fmt, Report(True))
    previews._decoder = decoder = Decoder(model, compile="aot_eager")
    t = time.perf_counter()
    previews.run_timed(model, 1)
    elapsed = time.perf_counter() - t
    setup = decoder.setup_s
    assert setup > 0.2  # dynamo traced the step's functions
    assert 0 < previews.cost <= elapsed - setup + 0.01
    said = capsys.readouterr().err
    assert "previews take" in said and "once, to compile and capture the decoder" in said
    previews.run_timed(model, 2)  # nothing to set up again: all of it is the previews' cost
    assert decoder.setup_s == setup and previews.cost > 0
