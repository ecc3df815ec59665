"""Text normalisation before scoring: the rewrites that hide a request from a detector but not from a model.

A model reads ``е`` (Cyrillic) as ``e``, skips a zero-width space, and decodes base64 in its head; a
detector trained on plain text does not. :func:`normalize` undoes the trivial rewrites, in this order:

1. ``nfkc``: Unicode NFKC (fullwidth ``ｂｏｍｂ``, mathematical ``𝐛𝐨𝐦𝐛``, ligatures, circled letters).
2. ``invisible``: zero-width characters, bidi controls, soft hyphens, variation selectors, Unicode
   tag characters and combining marks left stacked on ASCII letters (strikethrough, Zalgo) removed.
3. ``homoglyphs``: Cyrillic, Greek and other Latin look-alikes folded to ASCII in words that mix them
   with Latin letters or consist only of look-alikes (real Cyrillic or Greek words are left alone: they
   hold letters with no Latin twin).

:func:`decoded_segments` finds encoded text (``base64``, ``hex``, URL ``percent`` escapes, ASCII
smuggled in Unicode ``tags``, ``leet`` words such as ``b0mb`` read as letters) and returns its
decoding; callers score each decoded text as an extra text and block when one trips a rule. Nothing
here changes what the model generates from: the guard scores the normalized and decoded texts, and
generates from the original (see ``docs/reliability.md``).
Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

Encoding = Literal["base64", "hex", "percent", "tags", "leet"]
ENCODINGS: tuple[Encoding, ...] = ("base64", "hex", "percent", "tags", "leet")


class NormalizeSpec(BaseModel):
    """The ``normalize:`` section of a policy: which rewrites are undone before scoring (all by default).

    ``normalize: false`` turns every step off (the text is scored exactly as given); ``true`` is the default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nfkc: bool = Field(default=True, description="Unicode NFKC (fullwidth, mathematical and compatibility forms)")
    invisible: bool = Field(default=True, description="Remove zero-width, bidi-control, tag and stacked combining "
                                                      "characters")
    homoglyphs: bool = Field(default=True, description="Fold Cyrillic/Greek look-alikes of Latin letters in Latin "
                                                       "words")
    decode: list[Encoding] = Field(default_factory=lambda: list(ENCODINGS),
                                   description="Encodings decoded and scored as extra texts: base64, hex, percent, "
                                               "tags, leet (empty: none)")
    max_decoded: int = Field(default=4, ge=0, le=64, strict=True,
                             description="Decoded segments scored per text at most (the longest first)")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, v: Any) -> Any:
        if v is True:
            return {}
        if v is False:
            return {"nfkc": False, "invisible": False, "homoglyphs": False, "decode": []}
        return v

    @property
    def enabled(self) -> bool:
        """True when any step is on."""
        return self.nfkc or self.invisible or self.homoglyphs or bool(self.decode)


OFF = NormalizeSpec.model_validate(False)
"""The spec with every step off."""


class Decoded(NamedTuple):
    """One encoded segment found in a text, and its decoding."""

    encoding: str
    """base64, hex, percent or tags."""
    start: int
    """Start of the encoded segment in the normalized text (characters)."""
    end: int
    """End (exclusive)."""
    text: str
    """The decoded text (normalized itself)."""


class Normalized(NamedTuple):
    """A text after :func:`normalize`, with what was done to it."""

    text: str
    """The text to score."""
    steps: tuple[str, ...]
    """Steps that changed something, in order (nfkc, invisible, homoglyphs)."""
    decoded: tuple[Decoded, ...] = ()
    """Encoded segments found (their decoded texts are scored too)."""

    @property
    def changed(self) -> bool:
        return bool(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for decisions and audit records (decoded texts cut to 200 characters)."""
        return {"steps": list(self.steps),
                "decoded": [{"encoding": d.encoding, "start": d.start, "end": d.end, "text": d.text[:200]}
                            for d in self.decoded]}


# -- invisible characters -----------------------------------------------------------------------------------

_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
)
_TAGS = re.compile("[\U000e0020-\U000e007e]+")


def _strip_marks_on_ascii(text: str) -> str:
    """Drop combining marks that sit on an ASCII letter and did not compose with it (NFC-stable)."""
    out: list[str] = []
    prev_ascii = False
    for ch in text:
        if unicodedata.combining(ch) and prev_ascii:
            continue
        out.append(ch)
        prev_ascii = (ch.isascii() and ch.isalpha()) or (prev_ascii and bool(unicodedata.combining(ch)))
    return "".join(out)


# -- homoglyphs ---------------------------------------------------------------------------------------------

_CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l",
    "ɡ": "g", "ո": "n", "ս": "u", "ց": "g", "օ": "o", "ᴠ": "v", "ѵ": "v", "ʏ": "y",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W", "Һ": "H", "Ӏ": "I",
    # Greek
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i", "κ": "k", "τ": "t", "υ": "u", "χ": "x", "ε": "e",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    # Latin look-alikes outside ASCII that NFKC keeps
    "ı": "i", "ȷ": "j", "ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ŀ": "l", "ƅ": "b", "ɑ": "a", "ɩ": "i",
    "ʋ": "u", "ᴄ": "c", "ᴏ": "o", "ᴜ": "u", "ᴡ": "w", "ᴢ": "z", "ꮃ": "w",
}
_CONFUSABLE_RE = re.compile("[" + "".join(sorted(_CONFUSABLES)) + "]")
_WORD = re.compile(r"\w+")


def _fold(text: str) -> str:
    """Fold look-alikes in words that mix them with Latin letters; in a text with no other non-Latin letter
    (so not Russian or Greek prose), also in words made of look-alikes only."""
    foreign = any(c.isalpha() and not c.isascii() and c not in _CONFUSABLES and unicodedata.name(c, "").split(" ")[0]
                  in ("CYRILLIC", "GREEK", "ARMENIAN") for c in text)

    def fold_word(m: re.Match[str]) -> str:
        word = m.group(0)
        if not _CONFUSABLE_RE.search(word):
            return word
        letters = [c for c in word if c.isalpha()]
        has_latin = any(c.isascii() for c in letters)
        only_lookalikes = all(c.isascii() or c in _CONFUSABLES for c in letters)
        if has_latin or (only_lookalikes and not foreign):
            return _CONFUSABLE_RE.sub(lambda c: _CONFUSABLES[c.group(0)], word)
        return word

    return _WORD.sub(fold_word, text)


def normalize(text: str, spec: NormalizeSpec | None = None) -> Normalized:
    """``text`` with the steps of ``spec`` (default: all) applied, and its encoded segments decoded."""
    spec = spec or NormalizeSpec()
    steps: list[str] = []
    out = text
    if spec.nfkc:
        new = unicodedata.normalize("NFKC", out)
        if new != out:
            steps.append("nfkc")
        out = new
    tags = _TAGS.findall(out) if "tags" in spec.decode else []
    if spec.invisible:
        new = _strip_marks_on_ascii(_INVISIBLE.sub("", out))
        if new != out:
            steps.append("invisible")
        out = new
    if spec.homoglyphs:
        new = _fold(out)
        if new != out:
            steps.append("homoglyphs")
        out = new
    decoded = decoded_segments(out, spec, tags)
    return Normalized(out, tuple(steps), decoded)


# -- encodings ----------------------------------------------------------------------------------------------

_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:(?:0x|\\x)?[0-9A-Fa-f]{2}[\s:,-]?){8,}")
_PCT = r"(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9._~+-])*"
_PERCENT = re.compile(_PCT + r"(?:%[0-9A-Fa-f]{2}){3,}" + _PCT)


_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "|": "l"})
_LEET_WORD = re.compile(r"[A-Za-z0-9@$|]*[A-Za-z][A-Za-z0-9@$|]*")


def _is_leet(word: str) -> bool:
    """A word that mixes letters with leet digits/symbols (``b0mb``, ``h4ck``, ``$teal``), not ``mp3`` or ``4k``."""
    letters = sum(c.isalpha() for c in word)
    if letters < 2 or not 3 <= len(word) <= 15:  # longer: an id, a hash, base64
        return False
    inner = any(c in "013457@$|" and word[i - 1].isalpha() and word[i + 1].isalpha()
                for i, c in enumerate(word[1:-1], 1))
    n_leet = sum(c in "013457@$|" for c in word)
    return inner or n_leet >= 2 or word[0] in "$@"  # one trailing digit (Base64, Covid19, mp3) is not leet


def _readable(raw: bytes) -> str | None:
    """``raw`` as UTF-8 text if it reads as text (mostly letters and spaces), else None."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(s) < 4:
        return None
    printable = sum(c.isprintable() or c in "\n\t" for c in s) / len(s)
    letters = sum(c.isalpha() for c in s) / len(s)
    return s if printable >= 0.95 and letters >= 0.5 and any(c.isspace() for c in s) else None


def _b64(seg: str) -> str | None:
    core = seg.rstrip("=")
    if core.isalpha() and (core.islower() or core.isupper()):
        return None  # a long plain word, not an encoding
    padded = core + "=" * (-len(core) % 4)
    for alt in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=alt, validate=True)
        except (binascii.Error, ValueError):
            continue
        text = _readable(raw)
        if text is not None:
            return text
    return None


def _hex(seg: str) -> str | None:
    digits = re.sub(r"0x|\\x|[\s:,-]", "", seg)
    if len(digits) % 2:
        digits = digits[:-1]
    try:
        return _readable(bytes.fromhex(digits))
    except ValueError:
        return None


def decoded_segments(text: str, spec: NormalizeSpec | None = None, tags: Iterable[str] = ()) -> tuple[Decoded, ...]:
    """Encoded segments of ``text`` (normalized) and their decodings, longest first, at most ``max_decoded``."""
    spec = spec or NormalizeSpec()
    found: list[Decoded] = []
    if "base64" in spec.decode:
        for m in _B64.finditer(text):
            d = _b64(m.group(0))
            if d is not None:
                found.append(Decoded("base64", m.start(), m.end(), d))
    if "hex" in spec.decode:
        for m in _HEX.finditer(text):
            d = _hex(m.group(0))
            if d is not None:
                found.append(Decoded("hex", m.start(), m.end(), d))
    if "percent" in spec.decode:
        for m in _PERCENT.finditer(text):
            d = urllib.parse.unquote_plus(m.group(0), errors="strict") if _valid_percent(m.group(0)) else None
            if d is not None and d != m.group(0) and _readable(d.encode()) is not None:
                found.append(Decoded("percent", m.start(), m.end(), d))
    if "leet" in spec.decode:
        taken = [(d.start, d.end) for d in found]
        words = [m for m in _LEET_WORD.finditer(text) if _is_leet(m.group(0))
                 and not any(a <= m.start() < b for a, b in taken)]
        if words:
            out_text, last = [], 0
            for m in words:
                out_text += [text[last : m.start()], m.group(0).translate(_LEET)]
                last = m.end()
            found.append(Decoded("leet", words[0].start(), words[-1].end(), "".join(out_text) + text[last:]))
    for t in tags:
        plain = "".join(chr(ord(c) - 0xE0000) for c in t)
        if plain.strip():
            found.append(Decoded("tags", -1, -1, plain))
    found.sort(key=lambda d: -len(d.text))
    inner = spec
    out = []
    for seg in found[: spec.max_decoded]:
        # decoded text is normalized too (a base64 of homoglyphs); one level, so no decode loops
        n = normalize(seg.text, inner.model_copy(update={"decode": []}))
        out.append(seg._replace(text=n.text))
    return tuple(out)


def _valid_percent(seg: str) -> bool:
    try:
        urllib.parse.unquote_plus(seg, errors="strict")
    except UnicodeDecodeError:
        return False
    return True


def texts_to_score(text: str, spec: NormalizeSpec | None) -> tuple[Normalized, list[str]]:
    """The normalized text and the decoded texts a scan scores (``[]`` of extras when there are none)."""
    n = normalize(text, spec) if spec is not None and spec.enabled else Normalized(text, ())
    return n, [d.text for d in n.decoded]


__all__ = ["ENCODINGS", "OFF", "Decoded", "NormalizeSpec", "Normalized", "decoded_segments", "normalize",
           "texts_to_score"]
