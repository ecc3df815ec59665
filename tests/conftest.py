"""Test session setup: offline always (no hub, no sockets), and shared tiny models and tokenizer."""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import socket
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import pytest
import torch

from tests.builders import tiny_lm, tiny_tokenizer

_NET_FAMILIES = {socket.AF_INET, socket.AF_INET6}


class NetworkBlockedError(OSError):
    """A test tried to open a network connection; tests run offline."""


def _refuse(self: socket.socket, address: Any, *_: Any) -> Any:
    raise NetworkBlockedError(f"network access is blocked in tests (tried to connect to {address!r})")


@pytest.fixture(scope="session", autouse=True)
def _no_network() -> Iterator[None]:
    """Block every IP connection for the whole session (Unix sockets stay usable)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in _NET_FAMILIES:
            _refuse(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if self.family in _NET_FAMILIES:
            _refuse(self, address)
        return real_connect_ex(self, address)

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket.socket, "connect_ex", connect_ex)
    try:
        yield
    finally:
        mp.undo()


_REAL_CONNECT = socket.socket.connect  # before the session fixture replaces it


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this test connect to 127.0.0.1 (a server it starts itself); every other address stays blocked."""

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in _NET_FAMILIES and not (isinstance(address, tuple) and address[0] == "127.0.0.1"):
            _refuse(self, address)
        return _REAL_CONNECT(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@cache
def _tokenizer() -> Any:
    return tiny_tokenizer()


@cache
def _lm(arch: str) -> Any:
    return tiny_lm(arch, _tokenizer())


@pytest.fixture(scope="session")
def tok() -> Any:
    """The tiny byte-level BPE tokenizer (tests.builders.tiny_tokenizer), shared by the session."""
    return _tokenizer()


@pytest.fixture(scope="session")
def lm() -> Callable[[str], Any]:
    """``lm(arch)``: a tiny causal LM of ``arch`` sized to ``tok``'s vocabulary, built once per session.

    Tests must leave the model as they found it (no weight edits; hooks are always removed).
    """
    return _lm


from tests._counts import pytest_terminal_summary  # noqa: E402, F401  (prints the robustness case counts)
