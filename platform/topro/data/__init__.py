"""Data: readers, the task registry, language metadata and split loading (Ray-free)."""
from topro.data.loading import available_languages, load_split, resolve_data_dir
from topro.data.readers import (DataFormatError, Sentence, read_conll, read_conllu,
                                read_xtreme_tsv)
from topro.data.tasks import Task, get_task, language_meta, list_tasks

__all__ = ["DataFormatError", "Sentence", "Task", "available_languages", "get_task", "language_meta",
           "list_tasks", "load_split", "read_conll", "read_conllu", "read_xtreme_tsv", "resolve_data_dir"]
