"""Writes voxtui's bundled sample data: engine/samples/medqa_{train,val}.jsonl.

The rows are built from scripts/medqa_facts.py, written for this project. Same input → same bytes.
Run: python scripts/make_sample_data.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from medqa_facts import FACTS, TOPICS  # noqa: E402

QUESTIONS = {
    "en": {
        "overview": ["What is {name}?", "Can you explain {name} in simple terms?", "Give me a short overview of {name}."],
        "symptoms": ["What are the symptoms of {name}?", "How do I know if I have {name}?", "Which signs suggest {name}?"],
        "causes": ["What causes {name}?", "Why do people get {name}?", "What are the risk factors for {name}?"],
        "diagnosis": ["How is {name} diagnosed?", "What tests confirm {name}?", "How will a doctor check for {name}?"],
        "treatment": ["How is {name} treated?", "What treatments are available for {name}?", "What is the usual treatment for {name}?"],
        "prevention": ["How can {name} be prevented?", "What can I do to lower my risk of {name}?", "Is there a way to avoid {name}?"],
        "see_doctor": ["When should someone with {name} see a doctor urgently?", "What warning signs of {name} need emergency care?",
                       "When is {name} an emergency?"],
    },
    "ko": {
        "overview": ["{name}이란 무엇인가요?", "{name}에 대해 쉽게 설명해 주세요.", "{name}에 대해 간단히 알려 주세요."],
        "symptoms": ["{name}의 증상은 무엇인가요?", "{name}인지 어떻게 알 수 있나요?", "{name}을 의심할 수 있는 증상은 무엇인가요?"],
        "causes": ["{name}의 원인은 무엇인가요?", "{name}은 왜 생기나요?", "{name}의 위험 요인은 무엇인가요?"],
        "diagnosis": ["{name}은 어떻게 진단하나요?", "{name}을 확인하는 검사는 무엇인가요?", "병원에서는 {name}을 어떻게 확인하나요?"],
        "treatment": ["{name}은 어떻게 치료하나요?", "{name}의 치료 방법에는 무엇이 있나요?", "{name}의 일반적인 치료는 무엇인가요?"],
        "prevention": ["{name}을 예방하려면 어떻게 해야 하나요?", "{name}의 위험을 줄이는 방법은 무엇인가요?", "{name}을 피할 수 있는 방법이 있나요?"],
        "see_doctor": ["{name}이 있을 때 언제 바로 병원에 가야 하나요?", "응급 진료가 필요한 {name}의 경고 증상은 무엇인가요?",
                       "{name}은 언제 응급 상황인가요?"],
    },
}
CONTEXTS = {
    "en": ["I am a 45-year-old man.", "My mother is 72 and lives alone.", "I am 29 and otherwise healthy.",
           "Asking for my 6-year-old son.", "I am 58 and take blood pressure medicine.", ""],
    "ko": ["45세 남성입니다.", "어머니가 72세이고 혼자 사십니다.", "29세이고 다른 병은 없습니다.",
           "6살 아들 때문에 여쭤봅니다.", "58세이고 혈압약을 먹고 있습니다.", ""],
}
CASE = {
    "en": ("A patient asks about {name}. Explain briefly what it is and when they must get help.",
           "{overview} {see_doctor}"),
    "ko": ("환자가 {name}에 대해 묻습니다. 무엇인지와 언제 도움을 받아야 하는지 간단히 설명해 주세요.",
           "{overview} {see_doctor}"),
}


def with_particles(template: str, name: str) -> str:
    """Fill ``{name}`` and pick the Korean particle that fits the name's last syllable (을/를, 은/는, 이/가)."""
    last = name[-1]
    digits_batchim = {"0": 1, "1": 1, "3": 1, "6": 1, "7": 1, "8": 1}
    if "가" <= last <= "힣":
        batchim = (ord(last) - 0xAC00) % 28 != 0
    else:
        batchim = bool(digits_batchim.get(last, 0))
    pairs = (("을", "를"), ("은", "는"), ("이란", "란"), ("이 ", "가 "))
    for with_b, without in pairs:
        template = template.replace("{name}" + with_b, "{name}" + (with_b if batchim else without))
    return template.format(name=name)


def pick(options: list[str], *key: str) -> str:
    h = int.from_bytes(hashlib.sha256("|".join(key).encode()).digest()[:4], "big")
    return options[h % len(options)]


def rows() -> list[dict]:
    out = []
    for en_name, ko_name, facts in FACTS:
        for lang, name, idx in (("en", en_name, 0), ("ko", ko_name, 1)):
            for topic in TOPICS:
                q = with_particles(pick(QUESTIONS[lang][topic], en_name, topic, lang), name)
                ctx = pick(CONTEXTS[lang], en_name, topic, lang, "ctx") if topic in ("treatment", "see_doctor") else ""
                out.append({"instruction": q, "input": ctx, "output": facts[topic][idx], "lang": lang, "topic": topic})
            instruction, answer = CASE[lang]
            out.append({
                "instruction": with_particles(instruction, name), "input": "",
                "output": answer.format(overview=facts["overview"][idx], see_doctor=facts["see_doctor"][idx]),
                "lang": lang, "topic": "case",
            })
    return out


def main() -> None:
    dest = Path(__file__).resolve().parent.parent / "engine" / "samples"
    train, val = [], []
    for r in rows():
        h = int.from_bytes(hashlib.sha256(r["instruction"].encode()).digest()[:4], "big")
        (val if h % 10 == 0 else train).append(r)
    for name, data in (("medqa_train.jsonl", train), ("medqa_val.jsonl", val)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
        (dest / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(data)} rows")


if __name__ == "__main__":
    main()
