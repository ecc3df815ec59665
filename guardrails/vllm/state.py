"""Per-request guard state inside a vLLM worker (torch only: no vLLM import here).

vLLM runs every request of a step in one flat ``[tokens_in_step, hidden]`` tensor, prefill chunks and
decode tokens mixed, and the order of requests changes between steps. :class:`GuardState` is told the
layout of each step (:meth:`GuardState.begin_step`: request ids in row order, rows per request, the
absolute position and token id of each row) and then scores each request's rows at every watched layer
with that request's own :class:`~guardrails.engine.run.GuardRun` (batch 1, fed ``[1, n_rows, hidden]``),
so windows and latches carry across steps and chunks exactly as in :class:`~guardrails.serving.generation.GuardedModel`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from guardrails.core.cascade import JudgeOutcome
from guardrails.core.policy import Policy
from guardrails.core.semantics import ROLE_CODES
from guardrails.engine.run import GuardRun, StepContext

logger = logging.getLogger(__name__)

EXTRA_ARGS_KEY = "guardrails"
"""Key of the guard's settings in ``SamplingParams.extra_args``: ``{"policy": name, "key": id, ...}``."""

MAX_FINISHED = 4096
"""Results of finished requests kept for reading back (oldest dropped first)."""


class GuardSetupError(RuntimeError):
    """The guard cannot run inside this vLLM engine (eager mode off, wrong model runner, mismatch...)."""


@dataclass
class CompiledGuard:
    """One policy ready to score: the compiled policy, the layers it hooks and the last of them."""

    compiled: Any
    """A :class:`~guardrails.engine.compile.CompiledPolicy` (its scorers sit on the model's device)."""
    layers: frozenset[int] = field(init=False)
    """Every layer the policy reads or steers (a ``steering:`` entry's layers too, as GuardedModel hooks)."""
    last: int = field(init=False)
    """The deepest hooked layer: a request's step is finished there."""

    def __post_init__(self) -> None:
        self.layers = frozenset(self.compiled.hooked_layers)  # as GuardedModel hooks: scored, fed and steered
        self.last = max(self.layers)

    @property
    def policy(self) -> Policy:
        return self.compiled.policy  # type: ignore[no-any-return,unused-ignore]

    @property
    def scorers(self) -> dict[int, Any]:
        return self.compiled.scorers  # type: ignore[no-any-return,unused-ignore]

    @property
    def deepest(self) -> int:
        return int(self.compiled.deepest)



def compile_guard(policy: Policy, model: Any) -> CompiledGuard:
    """Compile ``policy`` against the served (vLLM) model with ``guardrails.engine.compile.compile_policy``."""
    from guardrails.engine.compile import compile_policy

    return CompiledGuard(compile_policy(policy, model))


@dataclass
class RequestGuard:
    """The guard state of one request across all its steps."""

    key: str
    policy: str
    run: GuardRun
    prompt_length: int
    rid: str = ""
    """vLLM's id of the request (its rows are found by it every step)."""
    roles: Tensor | None = None
    """Role code of each prompt position (the run's ``prompt_roles`` as a tensor), or None."""
    tokens: dict[int, int] = field(default_factory=dict)
    """Token id at each position seen by the hook (prompt and output)."""
    capture: dict[int, list[Tensor]] | None = None
    """Self-check only: the residual rows seen at each watched layer."""

    @property
    def blocked(self) -> bool:
        return self.run.blocked_at[0] is not None

    def result(self) -> dict[str, Any]:
        """What the caller reads back: plain data (crosses process boundaries)."""
        run = self.run
        blocked_at = run.blocked_at[0]
        return {
            "key": self.key,
            "policy": self.policy,
            "prompt_length": self.prompt_length,
            "blocked_at": blocked_at,
            "block_rule": run.block_rule[0],
            "steered": run.steered(0),
            "decisions": [dict(d.__dict__) for d in run.decisions],
            "token_scores": run.token_scores(0),
            "token_features": run.token_features(0),
            "errors": list(run.errors),
            "tripping_token": self.tokens.get(blocked_at) if blocked_at is not None else None,
            "capture": {k: torch.cat(v).tolist() for k, v in self.capture.items()} if self.capture else None,
        }


@dataclass
class _Segment:
    guard: RequestGuard
    batch_index: int
    start: int
    end: int
    ctx: StepContext


RequestInfo = Callable[[str], tuple[Mapping[str, Any] | None, int]]
"""``info(req_id) -> (the request's guard settings from extra_args or None, prompt length)``."""


class GuardState:
    """All guarded requests of one worker, and the layout of the step being run."""

    def __init__(
        self,
        guards: dict[str, CompiledGuard],
        special_ids: list[int],
        *,
        default_policy: str | None = None,
        record_trace: bool = True,
    ) -> None:
        if not guards:
            raise GuardSetupError("no policy given to the vLLM guard")
        if default_policy is not None and default_policy not in guards:
            raise GuardSetupError(f"default policy {default_policy!r} not loaded; loaded: {', '.join(guards)}")
        self.guards = guards
        self.default_policy = default_policy
        self.record_trace = record_trace
        lut = torch.zeros(max(special_ids, default=0) + 1, dtype=torch.bool)
        if special_ids:
            lut[torch.tensor(sorted(set(special_ids)))] = True
        self._special = lut
        self.layers = sorted({layer for g in guards.values() for layer in g.layers})
        self.requests: OrderedDict[str, RequestGuard] = OrderedDict()
        self._by_rid: dict[str, RequestGuard | None] = {}
        """vLLM request id -> its guard (None: an unguarded request), so a step asks vLLM only about new ones."""
        self.segments: list[_Segment] = []
        self.blocked_rows: list[int] = []
        """Batch indices (logits rows) of requests blocked so far that must end this step."""
        self.hook_calls = 0
        self.steps = 0
        self._assistant_rows: dict[int, Tensor] = {}

    # -- per step ---------------------------------------------------------------------------------------
    def begin_step(
        self, req_ids: list[str], row_counts: list[int], positions: Tensor, token_ids: Tensor, info: RequestInfo
    ) -> None:
        """Lay out the step: which rows belong to which guarded request, their positions and masks.

        The masks are computed once for the step's flat rows (a few tensor ops per step, not per request)
        and each request gets views of its rows; positions and token ids reach the CPU in one copy.
        """
        self.steps += 1
        self.segments = []
        self.blocked_rows = []
        total = int(sum(row_counts))
        if total == 0:
            return
        # one copy to the CPU (one sync on a GPU); copies: vLLM reuses these buffers next step, and the runs
        # keep the positions in their traces
        both = torch.stack([positions[:total].detach().long(), token_ids[:total].detach().long()]).to(
            "cpu", copy=True)
        pos_cpu, ids_cpu = both[0], both[1]
        lut = self._special
        special = lut[ids_cpu.clamp(0, len(lut) - 1)] & (ids_cpu < len(lut))
        score_all = (~special & (pos_cpu > 0))[None]
        pos_all = pos_cpu[None]
        ones = torch.ones_like(score_all)
        pos_list: list[int] | None = None
        ids_list: list[int] = []
        start = 0
        for i, (rid, n) in enumerate(zip(req_ids, row_counts, strict=True)):
            end = start + n
            if n <= 0:
                continue
            guard = self._by_rid[rid] if rid in self._by_rid else self._guard_of(rid, info)
            if guard is not None:
                if guard.blocked:
                    self.blocked_rows.append(i)
                else:
                    if pos_list is None:
                        pos_list, ids_list = pos_cpu.tolist(), ids_cpu.tolist()
                    guard.tokens.update(zip(pos_list[start:end], ids_list[start:end], strict=True))
                    p = pos_all[:, start:end]
                    first, last = pos_list[start], pos_list[end - 1]
                    if first >= guard.prompt_length and not self.guards[guard.policy].compiled.hooks_decode:
                        start = end  # decode rows of a policy that neither scores nor steers them: no hook work
                        continue
                    # decode rows are all output (the usual case: views and cached tensors, no tensor op)
                    is_out = ones[:, start:end] if first >= guard.prompt_length else p >= guard.prompt_length
                    roles = None if guard.roles is None else self._roles_at(guard.roles, p, first, last)
                    ctx = StepContext(positions=p, score_mask=score_all[:, start:end], is_output=is_out,
                                      steer_mask=ones[:, start:end], roles=roles)
                    self.segments.append(_Segment(guard, i, start, end, ctx))
            start = end

    def _roles_at(self, roles: Tensor, p: Tensor, first: int, last: int) -> Tensor:
        """Role codes at positions ``p`` (``[1, n]``, ascending): the prompt's, the assistant's past it."""
        n_roles = len(roles)
        if first >= n_roles:
            return self._assistant(p.shape[1])
        if last < n_roles:
            return roles[p]
        return roles[p.clamp(max=n_roles - 1)].masked_fill(p >= n_roles, ROLE_CODES["assistant"])

    def _assistant(self, n: int) -> Tensor:
        """A [1, n] tensor of the assistant's role code (read only; cached per width)."""
        t = self._assistant_rows.get(n)
        if t is None:
            t = self._assistant_rows[n] = torch.full((1, n), ROLE_CODES["assistant"], dtype=torch.long)
        return t

    def _guard_of(self, rid: str, info: RequestInfo) -> RequestGuard | None:
        args, prompt_length = info(rid)
        if args is None and self.default_policy is None:
            self._by_rid[rid] = None
            self._trim()
            return None
        args = args or {}
        key = str(args.get("key") or rid)
        guard = self.requests.get(key)
        if guard is not None:
            self._by_rid[rid] = guard
            return guard
        name = str(args.get("policy") or self.default_policy or "")
        if name not in self.guards:
            raise GuardSetupError(
                f"request {rid}: extra_args[{EXTRA_ARGS_KEY!r}]['policy'] = {name!r} is not loaded; "
                f"loaded: {', '.join(self.guards)}"
            )
        compiled = self.guards[name]
        run = compiled.compiled.new_run([prompt_length], steer=bool(args.get("steer", True)),
                                        record_trace=self.record_trace)
        for rule_id, outcome in (args.get("judged") or {}).items():  # the driver's verdicts (vllm/cascade.py)
            run.judge_presets[(str(rule_id), 0)] = JudgeOutcome(*outcome)
        hold = args.get("hold_bands") or ""
        run.hold_bands = hold if hold in ("input", "all") else ""
        roles = args.get("roles")
        role_t = None
        if roles is not None:  # role code of each prompt token (input rules read only the policy's input_roles)
            run.prompt_roles = [[int(r) for r in roles]]
            role_t = torch.tensor(run.prompt_roles[0], dtype=torch.long) if run.prompt_roles[0] else None
        guard = RequestGuard(key, name, run, prompt_length, rid=rid, roles=role_t,
                             capture={} if args.get("capture") else None)
        self.requests[key] = guard
        self._by_rid[rid] = guard
        self._trim()
        return guard

    def _trim(self) -> None:
        while len(self.requests) > MAX_FINISHED:
            _, old = self.requests.popitem(last=False)
            self._by_rid.pop(old.rid, None)
        while len(self._by_rid) > 2 * MAX_FINISHED:  # unguarded requests are never read back
            self._by_rid.pop(next(iter(self._by_rid)))

    # -- the hook ---------------------------------------------------------------------------------------
    def on_layer(self, layer: int, residual: Tensor) -> list[tuple[int, int, Tensor]]:
        """Score each guarded request's rows at ``layer``; return ``(start, end, delta)`` steering edits."""
        self.hook_calls += 1
        edits: list[tuple[int, int, Tensor]] = []
        for seg in self.segments:
            guard = seg.guard
            compiled = self.guards[guard.policy]
            if layer not in compiled.layers or guard.blocked:
                continue
            rows = residual[seg.start : seg.end]
            if guard.capture is not None:
                guard.capture.setdefault(layer, []).append(rows.detach().float().cpu())
            run = guard.run
            run.ctx = seg.ctx
            h = rows[None]
            new = run.on_layer(layer, h)
            if new is not None:
                edits.append((seg.start, seg.end, (new - h)[0]))
            if layer == compiled.last:
                run.check_all_scored()
                run.ctx = None
                if guard.blocked:
                    self.blocked_rows.append(seg.batch_index)
        return edits

    # -- reading back -----------------------------------------------------------------------------------
    def pop_results(self, keys: list[str]) -> dict[str, dict[str, Any] | None]:
        """The result of each key (None if unknown), removing it from the worker."""
        out: dict[str, dict[str, Any] | None] = {}
        for k in keys:
            guard = self.requests.pop(k, None)
            if guard is not None:
                self._by_rid.pop(guard.rid, None)
            out[k] = guard.result() if guard is not None else None
        return out


_ACTIVE: GuardState | None = None


def active_state() -> GuardState | None:
    """The guard state of this worker process (set by the worker extension, read by the logits processor)."""
    return _ACTIVE


def set_active_state(state: GuardState | None) -> None:
    global _ACTIVE
    _ACTIVE = state
