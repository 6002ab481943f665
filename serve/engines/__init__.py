"""Inference engines behind one contract (base.py): the transformers engine and the vLLM engine."""
