"""Getting data in: fetch (download + verify), preprocess (raw -> uint8 tensors + splits)."""
