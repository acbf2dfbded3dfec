"""exporter.pods.labelvalues: any name, from any source, becomes a value every output can carry."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.pods.identity import Identity
from exporter.pods.labelvalues import MAX_LEN, clean


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nginx.service", "nginx.service"),
        ("caf\u00e9-\u6771\u4eac", "caf\u00e9-\u6771\u4eac"),  # valid UTF-8 stays as it is
        (os.fsdecode(b"bad\xff\xfename.service"), "bad\\xff\\xfename.service"),
        ("a\udcff\ud800b", "a\\udcff\\ud800b"),  # lone surrogates from JSON
        ('quote" back\\slash\nnewline', 'quote" back\\slash\nnewline'),  # the exposition escapes these
        ("x" * 300, "x" * MAX_LEN),
        ("", ""),
    ],
)
def test_clean(text: str, expected: str) -> None:
    assert clean(text) == expected


def test_valid_text_is_the_same_object() -> None:
    text = "web-7c9f8d6b5-x2x4q"
    assert clean(text) is text


@given(st.binary(max_size=300))
def test_any_bytes_name_becomes_encodable_and_bounded(name: bytes) -> None:
    out = clean(os.fsdecode(name))
    out.encode("utf-8")
    assert len(out) <= MAX_LEN
    if len(name) < MAX_LEN // 4:
        assert os.fsdecode(name) == out or b"\\x" in out.encode() or "\\u" in out


@given(st.text(alphabet=st.characters(), max_size=50))
def test_any_text_becomes_encodable(text: str) -> None:
    clean(text).encode("utf-8")


def test_identities_are_clean() -> None:
    ident = Identity("ns\udcff", "pod", os.fsdecode(b"c\xfe"), "w", "Deployment", "uid")
    assert ident.labels == ("ns\\xff", "pod", "c\\xfe", "w", "Deployment")
    assert ident == Identity("ns\\xff", "pod", "c\\xfe", "w", "Deployment", "uid")
