"""Guarded generation over a Hugging Face causal LM: :class:`GuardedModel`, its decode loop and streams,
and the bundled model loader."""
