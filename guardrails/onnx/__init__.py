"""ONNX guard: export the scorer of a policy, and score texts with onnxruntime alone.

:func:`export_onnx` writes a folder::

    guard.onnx      the model cut after the deepest watched layer + the policy's scoring head
    manifest.json   rules (scope, threshold, window, action...), tokenizer facts, versions, parity
    policy.yaml     the policy, for the record
    tokenizer.json  (+ tokenizer_config.json, chat template) the model's tokenizer

The graph takes ``input_ids``, ``attention_mask`` and ``position_ids`` (``[batch, seq]`` int64,
dynamic axes) and returns per-token rule scores ``[batch, seq, n_rules]`` before windowing, in the
policy's rule order. It runs the embeddings and decoder blocks ``0..L`` with the rotary embeddings and
a 4-D causal + padding mask built with ``finfo(dtype).min`` (``-inf`` gives NaN rows for padding),
then per watched layer: the encoder rows of the watched features with the SAE's activation rule
(``watched``), or for ``exact`` TopK the full pre-activations and the k-th largest as the cut
(a feature is kept when its pre-activation reaches it), and linear detectors; then each rule's
weighted ``sum``/``max``/``mean`` plus bias.

:class:`OnnxGuard` imports neither torch nor transformers: onnxruntime, numpy, ``tokenizers`` and
jinja2 (chat template). It applies the same positions rules as :meth:`GuardedModel.score` (padding,
position 0 and special tokens are not scored), scopes, windows, thresholds and actions, so its
per-rule max scores and decisions match the torch text guard. Decisions carry no ``top_features``
(the full SAE is not in the graph). Neither scan steers: a steer rule's decision does its
``steer.scan_action`` (default block; the manifest carries it) as in :meth:`GuardedModel.score`, and where a
steer rule reads a shallower layer than other rules and fires, both score the deeper layers on unsteered
activations, which a generation would have steered (the export warns).
Export code imports torch lazily, inside its functions.
"""

from guardrails.onnx.manifest import (
    CHECK_TEXTS,
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAMES,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    PARITY_RTOL,
    POLICY_FILE,
    TOKENIZER_FILE,
    OnnxGuardError,
)
from guardrails.onnx.serve import OnnxGuard, OnnxTextScore, relative_error, window_scores

__all__ = [
    "CHECK_TEXTS",
    "FORMAT",
    "FORMAT_VERSION",
    "INPUT_NAMES",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "OUTPUT_NAME",
    "PARITY_RTOL",
    "POLICY_FILE",
    "TOKENIZER_FILE",
    "ExportReport",
    "OnnxGuard",
    "OnnxGuardError",
    "OnnxTextScore",
    "build_scoring_graph",
    "check_parity",
    "export_onnx",
    "relative_error",
    "window_scores",
]


def __getattr__(name: str) -> object:  # export needs torch: import it only when asked for
    if name in ("ExportReport", "export_onnx", "check_parity", "build_scoring_graph"):
        from guardrails.onnx import export

        return getattr(export, name)
    raise AttributeError(f"module 'guardrails.onnx' has no attribute {name!r}")
