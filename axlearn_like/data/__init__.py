"""Data pipelines: text / ArrayRecord / generated-task sources, tokenizers, packed grain iterators."""
from axlearn_like.data.config import DataConfig
from axlearn_like.data.pipeline import make_dataset, make_iterator
from axlearn_like.data.sources import Corpus, load_corpus, stdlib_files
from axlearn_like.data.tasks import TASKS, copy_task, dyck_task, passkey_example, passkey_task
from axlearn_like.data.tokenizer import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = ["DataConfig", "make_iterator", "make_dataset", "make_tokenizer", "Tokenizer", "ByteTokenizer",
           "TASKS", "passkey_example", "copy_task", "passkey_task", "dyck_task", "Corpus", "load_corpus",
           "stdlib_files"]
