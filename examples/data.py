"""The byte-level stdlib corpus the examples train on; it lives in ``umup_fx.transfer.corpus`` so the
``sweep`` tool can use it too."""

from umup_fx.transfer.corpus import corpus_files, get_batch, load_corpus, train_val_split

__all__ = ["corpus_files", "get_batch", "load_corpus", "train_val_split"]
