"""A synthetic long-context suite (RULER-style), generated offline from seeds.

Tasks: single_needle, multi_key, multi_value, kv_retrieval, variable_tracking, common_words.
Prompt lengths are in tokens of the given tokenizer; the suite's own word-level tokenizer
(:func:`build_tokenizer`) makes them exact.
"""

from benchmarks.longctx.suite import Sample, generate_sample, generate_suite
from benchmarks.longctx.tasks import TASKS
from benchmarks.longctx.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

__all__ = [
    "TASKS",
    "Sample",
    "build_tokenizer",
    "generate_sample",
    "generate_suite",
    "load_tokenizer",
    "save_tokenizer",
]
