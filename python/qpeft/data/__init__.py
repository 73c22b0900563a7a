"""Instruction data: file readers, prompt templates, label masking, packing, and a generated task set."""

from .encode import IGNORE_INDEX, Encoded, EncodedSet, encode, encode_all
from .generated import TASKS, exact_match, make_records, make_splits, normalize_answer, write_jsonl
from .packing import Packed, collate, collate_packed, pack, pad_token_id
from .records import FORMATS, DataError, Example, Records, parse_record, read_records
from .templates import TEMPLATES, prompt_text, render, target_text

__all__ = [
    "DataError",
    "Encoded",
    "EncodedSet",
    "Example",
    "FORMATS",
    "IGNORE_INDEX",
    "Packed",
    "Records",
    "TASKS",
    "TEMPLATES",
    "collate",
    "collate_packed",
    "encode",
    "encode_all",
    "exact_match",
    "make_records",
    "make_splits",
    "normalize_answer",
    "pack",
    "pad_token_id",
    "parse_record",
    "prompt_text",
    "read_records",
    "render",
    "target_text",
    "write_jsonl",
]
