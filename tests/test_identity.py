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


def test_identity_folders_report_every_entry_they_do_not_read(tmp_path) -> None:
    """Sub-folders, symbolic links (never followed), non-photos and files at the root are
    reported with a reason; nothing is skipped silently."""
    from pv_ray.storage.identity_folders import list_identity_folders, read_identity_folder

    alice = tmp_path / "in" / "alice"
    (alice / "more-photos").mkdir(parents=True)
    (alice / "a.png").write_bytes(b"png bytes")
    (alice / "notes.txt").write_text("hi")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    (alice / "link.png").symlink_to(outside)
    (tmp_path / "in" / "README").write_text("a file at the root")
    (tmp_path / "in" / "linked-person").symlink_to(alice, target_is_directory=True)

    folders, invalid = list_identity_folders(str(tmp_path / "in"))
    assert [i for i, _ in folders] == ["alice"]
    assert dict(invalid) == {
        "README": "not an identity folder (a file at the input root)",
        "linked-person": "symbolic link (not followed)",
    }
    folder = read_identity_folder("alice", folders[0][1], max_photo_bytes=1000)
    assert folder.photos == {"a.png": b"png bytes"}
    assert dict(folder.skipped) == {
        "link.png": "symbolic link (not followed)",
        "more-photos": "sub-folder (identity folders are flat)",
        "notes.txt": "not a photo (extension not one of .jpg, .jpeg, .png, .webp)",
    }
