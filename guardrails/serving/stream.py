"""``GuardedStream``: text pieces as tokens are released; never a token at or after one that tripped a rule."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from guardrails.engine.run import GuardRun
from guardrails.serving.prompts import GenerationArgs, PromptLike, check_prompts, is_batch
from guardrails.serving.result import GenerationResult

if TYPE_CHECKING:
    from guardrails.serving.generation import GuardedModel


class GuardedStream:
    """Iterator of released text pieces; never yields a token at or after one that tripped a rule."""

    def __init__(self, guard: GuardedModel, prompt: PromptLike, **kwargs: Any) -> None:
        if is_batch(prompt):
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        self.guard = guard
        self.result: GenerationResult | None = None
        self._prompt = guard.format_prompt(prompt, kwargs.pop("chat", None))
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
        tok = self.guard.tokenizer
        sent = ""
        run: GuardRun | None = None
        released: list[list[int]] = [[]]
        steps = self.guard._steps([self._prompt], None, args, use_cache=use_cache)
        try:
            while True:
                with torch.inference_mode():
                    try:
                        run, released, _done = next(steps)
                    except StopIteration:
                        break
                text = tok.decode(released[0], skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # incomplete UTF-8 sequence: wait for the next token
                if len(text) > len(sent) and text.startswith(sent):
                    piece, sent = text[len(sent) :], text
                    yield piece
        finally:
            steps.close()  # removes the hooks even if the caller stops early
        assert run is not None
        self.result = self.guard._audit(self.guard._result(run, 0, self._prompt, released[0]))
        if not self.result.blocked and len(self.result.text) > len(sent) and self.result.text.startswith(sent):
            yield self.result.text[len(sent) :]  # a tail held back as an incomplete UTF-8 sequence
        if self.result.blocked:
            yield ("\n" if sent else "") + self.result.text
