"""raylm data stage: readers, cleaning, dedup, tokenizer training, tokenization, packing, writer."""
