"""``GuardedStream``: text pieces as tokens are released; never a token at or after one that tripped a rule.

What the stream showed is always ``result.released_text`` (the refusal, when blocked, comes after it and
is not released text). A stream the caller stops reading (``break``, ``close()``, dropped and garbage
collected, an exception in the consumer) still writes its audit record, of what it showed. A failure
after scoring has started (a model or decoding error mid-stream, building the result) follows the
policy's ``on_error`` instead of reaching the caller. When text normalisation finds something in the
prompt, the normalized prompt is scanned before the first token (:mod:`.prescan`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from guardrails.core.decision import TextScore
from guardrails.engine.run import GuardRun
from guardrails.serving.failsafe import apply_failure, result_or_on_error
from guardrails.serving.prescan import apply_prescan, fired, prescan, prescan_blocks
from guardrails.serving.prompts import GenerationArgs, PromptLike, check_prompts, is_batch
from guardrails.serving.result import GenerationResult

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel

logger = logging.getLogger(__name__)


class GuardedStream:
    """Iterator of released text pieces; never yields a token at or after one that tripped a rule."""

    def __init__(self, guard: GuardedModel, prompt: PromptLike, **kwargs: Any) -> None:
        if is_batch(prompt):
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        self.guard = guard
        self.result: GenerationResult | None = None
        self._raw = prompt
        self._chat = kwargs.pop("chat", None)
        self._prompt = guard.format_prompt(prompt, self._chat)
        use_cache = bool(kwargs.pop("use_cache", True))
        check_prompts([self._prompt])
        args = guard.generation_args(kwargs)  # the same check as generate()
        check = getattr(guard.audit, "check_writable", None)
        if check is not None:
            check()  # a stream shows text before the record is written: fail before, not after
        self._it = self._pieces(args, use_cache)

    def __iter__(self) -> Iterator[str]:
        return self._it

    def close(self) -> None:
        """Stop generating (the KV cache and state are dropped; no hooks are left either way)."""
        self._it.close()  # type: ignore[attr-defined]

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> str:
        return next(self._it)

    def _pieces(self, args: GenerationArgs, use_cache: bool) -> Iterator[str]:
        """Released pieces; ``sent`` is always exactly what the caller has been given (not the refusal)."""
        guard = self.guard
        tok = guard.tokenizer
        sent = ""
        run: GuardRun | None = None
        released: list[list[int]] = [[]]
        failure: Exception | None = None
        pre = prescan(guard, [self._raw], self._chat)[0]  # normalized/decoded prompt, before any token
        pending = pre is not None and pre.blocked  # a steer hit there blocks unless the prefill steers that rule
        if pre is not None and prescan_blocks(pre, None):
            self.result = guard._audit(apply_prescan(guard, [pre], [self._empty_result()])[0])
            yield self.result.text
            return
        steps = guard._steps([self._prompt], None, args, use_cache=use_cache)
        done = False
        try:
            while True:
                with torch.inference_mode():
                    try:
                        run, released, _done = next(steps)
                    except StopIteration:
                        break
                    except Exception as exc:
                        if run is None:
                            raise  # nothing was scored yet: a bad prompt or argument is the caller's error
                        failure = exc  # after scoring: the policy's on_error decides, not the caller
                        break
                if pending:  # after the prefill, before any text: did the original prompt steer those rules?
                    pending = False
                    assert pre is not None
                    if prescan_blocks(pre, fired(run.decisions)):
                        released = [[]]
                        break
                text = tok.decode(released[0], skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # incomplete UTF-8 sequence: wait for the next token
                if len(text) > len(sent) and text.startswith(sent):
                    piece, sent = text[len(sent) :], text
                    yield piece
            done = True
        finally:
            steps.close()  # removes the hooks even if the caller stops early
            if not done and run is not None and self.result is None:
                # stopped by the consumer (break, close, garbage collection, an exception): record what it saw
                try:
                    self.result = self._finish(run, released[0], sent, pre, None, stopped=True)
                except Exception:
                    logger.exception("audit record of a stopped stream failed")
        assert run is not None
        result = self._finish(run, released[0], sent, pre, failure, stopped=False)
        tail = ""
        if not result.blocked and len(result.text) > len(sent) and result.text.startswith(sent):
            tail = result.text[len(sent) :]  # a tail held back as an incomplete UTF-8 sequence
        result.released_text = sent + tail
        self.result = result
        if tail:
            yield tail
        if result.blocked:
            yield ("\n" if sent else "") + result.text

    def _finish(self, run: GuardRun, ids: list[int], sent: str, pre: TextScore | None, failure: Exception | None,
                *, stopped: bool) -> GenerationResult:
        """The result (audited) of a stream that showed ``sent``; failures after scoring follow on_error."""
        guard = self.guard
        result = result_or_on_error(guard, run, 0, self._prompt, ids, shown=sent)
        if failure is not None:
            result = apply_failure(guard, result, failure, "stream", sent)
        if pre is not None:
            result = apply_prescan(guard, [pre], [result])[0]
        if stopped:
            result.text = sent
            setattr(result, "stream_stopped", True)  # noqa: B010  (recorded in the audit body)
        result.released_text = sent
        result = guard._audit(result)
        result.released_text = sent  # what was shown stays what was shown, whatever the audit write did
        return result

    def _empty_result(self) -> GenerationResult:
        """A result with no output (for a prompt the pre-scan blocks before any token)."""
        tok = self.guard.tokenizer
        ids = tok(self._prompt, add_special_tokens=False)["input_ids"]
        return GenerationResult(text="", blocked=False, steered=False, decisions=[], prompt=self._prompt,
                                released_text="", tokens=tok.convert_ids_to_tokens(ids), prompt_length=len(ids),
                                policy=self.guard.policy.name)
