"""The types of option values: numbers that must be positive, counts and sizes where 0 means "no limit",
`--upstream`'s short forms; and how a default is shown in `--help`. Each refuses bad text with one line."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["count", "count_positive", "is_token_text", "positive", "shown", "size", "upstream_url"]

_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def count(text: str) -> int:
    """A non-negative integer; 0 means "no limit"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def count_positive(text: str) -> int:
    value = count(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def size(text: str) -> int:
    """A byte count, optionally with a K/M/G suffix (powers of 1024); 0 means "no limit"."""
    number, suffix = text.strip(), ""
    if number[-1:].lower() in ("k", "m", "g"):
        number, suffix = number[:-1], number[-1].lower()
    try:
        value = int(number) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 65536, 64K, 10M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def upstream_url(text: str) -> str:
    """`--upstream`: a URL, or as ngrok and cloudflared take it, `PORT` (http://127.0.0.1:PORT) or
    `HOST:PORT` (http://HOST:PORT). Anything else is left for the agent's own URL check."""
    text = text.strip()
    if text.isdigit():
        return f"http://127.0.0.1:{text}"
    host, sep, port = text.rpartition(":")
    if "://" not in text and sep and host and port.isdigit():
        return f"http://{text}"
    return text


def shown(default: Any) -> str:
    """A default as `--help` shows it (10.0 as 10)."""
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def is_token_text(token: str) -> bool:
    """Whether a secret can travel in an HTTP header as given: printable ASCII without spaces."""
    return token.isascii() and token.isprintable() and " " not in token
