"""Getting data in: fetch (download + verify), preprocess (raw -> uint8 tensors + splits), and
the in-memory batches and augmentation of training."""
