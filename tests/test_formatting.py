"""The chat format is mistral-common's instruct template, token for token."""

import warnings

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from engine.formatting import bundled_tekken_path, load_format, resolve_tokenizer_file
from engine.rows import parse_line
from engine.util import UsageError

ROWS = [
    {"instruction": "What causes gout?", "output": "High uric acid."},
    {"instruction": "두통이 있어요. 어떻게 해야 하나요?", "input": "45세 남성입니다.", "output": "물을 충분히 드세요."},
    {"instruction": "  Explain   asthma. ", "input": "", "output": " Airway inflammation. "},
    {"messages": [{"role": "system", "content": "You are a careful clinician."},
                  {"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "안녕하세요! 무엇을 도와드릴까요?"},
                  {"role": "user", "content": "What is GERD?"}, {"role": "assistant", "content": "Acid reflux."}]},
]


def reference(row):
    """The tokens mistral-common writes for the same conversation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mt = MistralTokenizer.from_file(str(bundled_tekken_path()), mode=ValidationMode.finetuning)
    if "messages" in row:
        cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        msgs = [cls[m["role"]](content=m["content"].strip()) for m in row["messages"]]
    else:
        user = row["instruction"].strip() + ("\n\n" + row["input"].strip() if row.get("input", "").strip() else "")
        msgs = [UserMessage(content=user), AssistantMessage(content=row["output"].strip())]
    return mt.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


@pytest.mark.parametrize("row", ROWS, ids=["en", "ko-input", "whitespace", "multi-turn-system"])
def test_encode_matches_mistral_common(fmt, row):
    import json

    ex, defects = parse_line(json.dumps(row, ensure_ascii=False).encode())
    assert ex is not None and not defects
    (prompt, target), = fmt.encode([ex])
    assert prompt + target == reference(row)
    assert target[-1] == fmt.eos and prompt[0] == fmt.bos and prompt[-1] == fmt.inst_end


def test_lengths_agree_with_encode(fmt):
    import json

    examples = [parse_line(json.dumps(r, ensure_ascii=False).encode())[0] for r in ROWS]
    pl, tl = fmt.lengths(examples)
    enc = fmt.encode(examples)
    assert pl == [len(p) for p, _ in enc] and tl == [len(t) for _, t in enc]


def test_encode_texts_equals_tekkenizer(fmt):
    texts = ["hello world", "고혈압은 혈압이 높은 상태입니다.", "", "emoji 🙂 and \ud800 lone surrogate"]
    for text, ids in zip(texts, fmt.encode_texts(texts)):
        assert ids == fmt.tekken.encode(text, bos=False, eos=False)
    assert fmt.vocab_size == 131072


def test_the_tokenizer_makes_its_vocabulary_list_on_first_use_and_answers_as_mistral_common(fmt):
    """ChatFormat's Tekkenizer skips listing every piece at load (0.8 s of each process's start); asked, its
    vocab() and id_to_piece equal the library's own, and encoding and decoding never needed them."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from engine.formatting import ChatFormat

    fresh = ChatFormat(bundled_tekken_path())
    assert isinstance(fresh.tekken, Tekkenizer) and fresh.tekken._pieces is None
    assert fresh.decode(fresh.encode_texts(["두통 headache"])[0]) == "두통 headache" and fresh.tekken._pieces is None
    ref = Tekkenizer.from_file(str(bundled_tekken_path()))
    assert [fresh.tekken.id_to_piece(i) for i in (0, 1, 2, 999, 1000, 131071)] == \
        [ref.id_to_piece(i) for i in (0, 1, 2, 999, 1000, 131071)]
    assert fresh.tekken.vocab() == ref.vocab() and fresh.tekken._vocab is fresh.tekken.vocab()
    assert len(fresh.tekken.vocab()) == fresh.vocab_size == 131072


def test_decode_round_trip(fmt):
    text = "혈당이 높아요. Blood sugar is high."
    assert fmt.decode(fmt.encode_texts([text])[0]) == text


def test_tokenizer_resolution(tmp_path, tiny_model):
    assert resolve_tokenizer_file(None) == bundled_tekken_path()
    assert resolve_tokenizer_file(tiny_model) == tiny_model / "tekken.json"
    assert load_format(tiny_model).fingerprint == load_format().fingerprint
    with pytest.raises(UsageError, match="no tekken.json"):
        resolve_tokenizer_file(tmp_path)
    with pytest.raises(UsageError, match="no such"):
        resolve_tokenizer_file(tmp_path / "missing" / "tekken.json")
