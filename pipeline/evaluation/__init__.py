"""Test-set evaluation of a trained model: accuracy per class and per input size, figures."""
