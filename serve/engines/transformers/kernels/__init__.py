"""The engine's C kernels (decode attention, segmented LoRA) and the builder that compiles them on first use."""
