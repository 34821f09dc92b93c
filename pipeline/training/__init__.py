"""Lightning training: the module, its optimizers and callbacks, `train`, and DDP's launcher."""
