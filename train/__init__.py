"""Turning a dataset into a LoRA / QLoRA adapter."""
