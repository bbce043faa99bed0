from __future__ import annotations

import pytest

from pv_ray.storage.identity import InvalidIdentityId, is_valid_identity_id, validate_identity_id


@pytest.mark.parametrize(
    "good", ["a", "0", "alice", "bob_01", "x.y-z", "a..b", "A" * 128, "console", "com10", "lpt", "nul_1", "a.con"]
)
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
        ("alice.", "ends with '.'"),
        ("a..", "ends with '.'"),
        ("CON", "'CON' is a reserved device name on Windows"),
        ("nul", "'nul' is a reserved device name on Windows"),
        ("Aux", "'Aux' is a reserved device name on Windows"),
        ("prn", "'prn' is a reserved device name on Windows"),
        ("com1", "'com1' is a reserved device name on Windows"),
        ("LPT9", "'LPT9' is a reserved device name on Windows"),
        ("con.txt", "'con' is a reserved device name on Windows"),
        ("NUL.tar.gz", "'NUL' is a reserved device name on Windows"),
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


def test_case_clashes_are_found():
    from pv_ray.storage.identity import case_clashes

    assert case_clashes(["alice", "bob", "ALICE", "Alice", "carol"]) == {
        "alice": ["ALICE", "Alice", "alice"],
        "ALICE": ["ALICE", "Alice", "alice"],
        "Alice": ["ALICE", "Alice", "alice"],
    }
    assert case_clashes(["alice", "bob"]) == {}


def test_ids_that_differ_only_in_case_are_all_refused(tmp_path) -> None:
    """`Alice` and `alice` are one folder on a case-folding file system: neither is picked; an input
    id spelt otherwise than one already in the adapter store (`taken`) is refused too."""
    from pv_ray.storage.identity_folders import list_identity_folders

    for name in ("Alice", "alice", "bob", "Carol", "CON", "dave."):
        (tmp_path / "in" / name).mkdir(parents=True)
    folders, invalid = list_identity_folders(str(tmp_path / "in"), taken=["carol", "bob"])
    assert [i for i, _ in folders] == ["bob"]
    reasons = dict(invalid)
    assert reasons["Alice"] == (
        "identity id 'Alice' differs only in case from 'alice' in the input "
        "(ids must be unique case-insensitively; rename one)"
    )
    assert "differs only in case from 'Alice'" in reasons["alice"]
    assert "differs only in case from 'carol' in the adapter store" in reasons["Carol"]
    assert "reserved device name" in reasons["CON"] and "ends with '.'" in reasons["dave."]


def test_photos_past_the_identity_caps_are_skipped_with_a_reason(tmp_path) -> None:
    from pv_ray.storage.identity_folders import read_identity_folder

    folder = tmp_path / "alice"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"x" * 100)
    read = read_identity_folder("alice", str(folder), max_photo_bytes=1000, max_photos=3)
    assert list(read.photos) == ["0.png", "1.png", "2.png"]
    assert dict(read.skipped) == dict.fromkeys(
        ["3.png", "4.png"], "over the cap of 3 photos per identity (faces.max_photos_per_identity)"
    )
    read = read_identity_folder("alice", str(folder), max_photo_bytes=1000, max_total_bytes=250)
    assert list(read.photos) == ["0.png", "1.png"]
    assert dict(read.skipped) == dict.fromkeys(
        ["2.png", "3.png", "4.png"], "over the cap of 250 bytes of photos per identity (faces.max_identity_bytes)"
    )


def test_an_unreadable_photo_folder_is_an_input_error(tmp_path) -> None:
    from pv_ray.errors import InputError
    from pv_ray.storage.identity_folders import read_identity_folder

    with pytest.raises(InputError, match="cannot read the photo folder .*nowhere: FileNotFoundError"):
        read_identity_folder("alice", str(tmp_path / "nowhere"), max_photo_bytes=1000)
