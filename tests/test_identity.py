from __future__ import annotations

import pytest

from pv_ray.storage.identity import InvalidIdentityId, is_valid_identity_id, validate_identity_id


@pytest.mark.parametrize("good", ["a", "0", "alice", "bob_01", "x.y-z", "a..b", "A" * 128])
def test_valid_ids_pass_unchanged(good: str) -> None:
    assert validate_identity_id(good) == good
    assert is_valid_identity_id(good)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        (".", "starts with '.'"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("-rf", "starts with '-'"),
        ("../x", "starts with '.'"),
        ("a/b", "forbidden characters ['/']"),
        ("a\\b", "forbidden characters ['\\\\']"),
        ("a\x00b", "forbidden characters ['\\x00']"),
        ("a b", "forbidden characters [' ']"),
        ("alice\n", "forbidden characters ['\\n']"),
        ("é", "starts with 'é'"),
        ("A" * 129, "129 characters long (max 128)"),
    ],
)
def test_invalid_ids_are_refused_with_the_reason(bad: str, reason: str) -> None:
    assert not is_valid_identity_id(bad)
    with pytest.raises(InvalidIdentityId, match="invalid identity id") as info:
        validate_identity_id(bad)
    assert reason in str(info.value)


def test_non_string_is_refused() -> None:
    assert not is_valid_identity_id(5)
    with pytest.raises(InvalidIdentityId, match="must be a str, got int"):
        validate_identity_id(5)

