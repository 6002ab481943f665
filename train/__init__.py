"""Turning a dataset into a LoRA / QLoRA adapter."""

import logging

# bitsandbytes' CPU backend warns on import that an optional kernel, fetched from a model hub by the
# `kernels` package, is missing. Nothing is ever fetched at run time here; its built-in kernel is used.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
