"""Bundled sample data: medical QA in Korean and English, written for voxtui (see README)."""

from pathlib import Path

TRAIN = Path(__file__).with_name("medqa_train.jsonl")
VAL = Path(__file__).with_name("medqa_val.jsonl")
