//! Training a byte-level BPE tokenizer like GPT-2's.
