"""Request bodies decoded the way CH's serde_json does it, with serde_json's error text.

A bad body gets `400 ["Failed to deserialize JSON", "<serde_json message>"]` from CH
(cloud-hypervisor-api.md §3). The message is serde_json's `Display`: what went wrong, then
` at line L column C`, where C counts the bytes consumed on that line. The position rules that
matter here:
- a value of the wrong type is reported where that value ends;
- a missing field is reported where its object ends;
- fields of a `#[serde(flatten)]`ed struct (FsConfig's `id`, `iommu`, `pci_segment` and
  `pci_device_id` from v52 on) are checked after the object was read, so their errors also point
  at the object's end, after the errors of the struct's own fields and of missing fields.

Syntax errors are mapped from Python's decoder messages to serde_json's wording; that mapping
covers the common cases, not every message serde_json can produce.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Path = tuple[str | int, ...]


class DeserializeError(Exception):
    """serde_json rejected the body; `str(error)` is serde_json's message."""


@dataclass(frozen=True)
class Kind:
    """A Rust type as serde sees it: its `expecting` text and a check of a JSON value."""

    expected: str
    accepts: Callable[[Any], bool]
    invalid_value: Callable[[Any], bool] = lambda value: False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unsigned(name: str, bits: int) -> Kind:
    """A Rust unsigned integer: other types are "invalid type", out of range "invalid value"."""
    return Kind(name, _is_int, lambda value: not 0 <= value < 1 << bits)


STRING = Kind("a string", lambda value: isinstance(value, str))
PATH = Kind("path string", lambda value: isinstance(value, str))
BOOL = Kind("a boolean", lambda value: isinstance(value, bool))
U8 = unsigned("u8", 8)
U16 = unsigned("u16", 16)
U32 = unsigned("u32", 32)
U64 = unsigned("u64", 64)
USIZE = unsigned("usize", 64)

REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One struct field: `default` is REQUIRED for fields without `#[serde(default)]`."""

    key: str
    kind: Kind
    default: Any = REQUIRED
    option: bool = False
    flattened: bool = False


class JsonDocument:
    """A parsed body that remembers where each value ends, for serde_json's positions."""

    def __init__(self, raw: bytes) -> None:
        try:
            self._text = raw.decode()
        except UnicodeDecodeError as exc:
            raise DeserializeError(
                f"invalid unicode code point at {_line_column(raw, exc.start)}"
            ) from None
        self.root = _loads(self._text)
        self._ends: dict[Path, int] = {}
        _record_ends(self._text, 0, (), self._ends)

    def at(self, path: Path) -> Any:
        """The value at `path` (keys and list indexes from the root)."""
        value = self.root
        for step in path:
            value = value[step]
        return value

    def read_struct(self, path: Path, name: str, fields: Sequence[Field]) -> dict[str, Any]:
        """Deserialize the object at `path` as Rust struct `name`; unknown keys are ignored."""
        value = self.at(path)
        if not isinstance(value, dict):
            raise self._error(f"invalid type: {_describe(value)}, expected struct {name}", path)
        by_key = {field.key: field for field in fields}
        result: dict[str, Any] = {}
        for key, item in value.items():
            field = by_key.get(key)
            if field is not None and not field.flattened:
                result[key] = self._check(field, item, (*path, key))
        for field in fields:
            if field.key not in value and field.default is REQUIRED:
                raise self._error(f"missing field `{field.key}`", path)
        for key, item in value.items():
            field = by_key.get(key)
            if field is not None and field.flattened:
                result[key] = self._check(field, item, path)
        for field in fields:
            if field.key not in result:
                result[field.key] = field.default
        return result

    def expect_list(self, path: Path) -> list[Any]:
        """The `Vec` at `path`."""
        value = self.at(path)
        if not isinstance(value, list):
            raise self._error(f"invalid type: {_describe(value)}, expected a sequence", path)
        return value

    def _check(self, field: Field, value: Any, where: Path) -> Any:
        if value is None and field.option:
            return None
        if not field.kind.accepts(value):
            raise self._error(
                f"invalid type: {_describe(value)}, expected {field.kind.expected}", where
            )
        if field.kind.invalid_value(value):
            raise self._error(
                f"invalid value: {_describe(value)}, expected {field.kind.expected}", where
            )
        return value

    def _error(self, message: str, where: Path) -> DeserializeError:
        return DeserializeError(f"{message} at {self._position(self._ends[where])}")

    def _position(self, end: int) -> str:
        return _line_column(self._text.encode(), len(self._text[:end].encode()))


def _line_column(raw: bytes, offset: int) -> str:
    """serde_json's position: the line, and the bytes consumed on it, at byte `offset`."""
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1)
    return f"line {line} column {column}"


def _describe(value: Any) -> str:
    """serde's `Unexpected` wording for a JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        return f"string {json.dumps(value, ensure_ascii=False)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _loads(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise DeserializeError(_serde_syntax_message(exc)) from None
    except ValueError:
        # NaN, Infinity: JSON has no such literals, serde_json expects a value there.
        raise DeserializeError("expected value at line 1 column 1") from None


def _serde_syntax_message(exc: json.JSONDecodeError) -> str:
    text, pos = exc.doc, exc.pos
    at_eof = not text[pos:].strip()
    container = _open_container(text[:pos])
    after_comma = text[:pos].rstrip().endswith(",") and text[pos : pos + 1] in ("]", "}")
    if exc.msg.startswith("Unterminated string"):
        message, at_eof = "EOF while parsing a string", True
    elif at_eof and exc.msg == "Expecting value":
        message = "EOF while parsing a value"
    elif at_eof:
        message = f"EOF while parsing {container or 'a value'}"
    elif after_comma:
        message = "trailing comma"
    elif exc.msg == "Extra data":
        message = "trailing characters"
    elif exc.msg.startswith("Expecting property name"):
        message = "key must be a string"
    elif exc.msg == "Expecting ':' delimiter":
        message = "expected `:`"
    elif exc.msg == "Expecting ',' delimiter":
        message = "expected `,` or `}`" if container == "an object" else "expected `,` or `]`"
    elif exc.msg.startswith("Invalid control character"):
        message = "control character (\\u0000-\\u001F) found while parsing a string"
    elif exc.msg.startswith("Invalid \\escape"):
        message = "invalid escape"
    else:
        message = "expected value"
    # At EOF serde_json has consumed everything, trailing whitespace included.
    offset = len(text) if at_eof else pos + 1
    raw = text.encode()
    return f"{message} at {_line_column(raw, len(text[:offset].encode()))}"


def _open_container(prefix: str) -> str | None:
    """The innermost object or list still open at the end of `prefix`, in serde's words."""
    stack: list[str] = []
    in_string = escaped = False
    for char in prefix:
        if in_string:
            escaped = not escaped and char == "\\"
            if char == '"' and not escaped:
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    if not stack:
        return None
    return "an object" if stack[-1] == "{" else "a list"


_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def _record_ends(text: str, index: int, path: Path, ends: dict[Path, int]) -> int:
    """Walk valid JSON and note, for every value, the offset just past its last character."""
    index = _skip(text, index)
    opener = text[index]
    if opener in "{[":
        closer = "}" if opener == "{" else "]"
        index = _skip(text, index + 1)
        position = 0
        while text[index] != closer:
            step: str | int = position
            if opener == "{":
                step, index = _DECODER.raw_decode(text, index)
                index = _skip(text, index) + 1  # the colon
            index = _skip(text, _record_ends(text, index, (*path, step), ends))
            position += 1
            if text[index] == ",":
                index = _skip(text, index + 1)
        end = index + 1
    else:
        _, end = _DECODER.raw_decode(text, index)
    ends[path] = end
    return end
