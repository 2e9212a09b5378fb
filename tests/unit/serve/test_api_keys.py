"""API keys: the file format, the constant-time check, reloads (Kubernetes' symlink swap included)."""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from secret_volume import write_secret_volume

from amalia_serve import api_keys
from amalia_serve.api_keys import (
    ANONYMOUS,
    ApiKeyError,
    ApiKeyStore,
    InvalidKey,
    MissingKey,
    parse_bearer,
    parse_keys,
)
from amalia_serve.config import AuthConfig

KEY_A = "sk-amalia-aaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-amalia-bbbbbbbbbbbbbbbbbbbbbbbb"
KEY_C = "sk-amalia-cccccccccccccccccccccccc"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> str:
    return f"Bearer {key}"


# === parse_keys ===


def test_parse_keys_reads_one_name_per_line_when_plain_yaml() -> None:
    keys = parse_keys(f"team-a: {KEY_A}\nbatch.eval_2: '{KEY_B}'\n", "test")
    assert sorted(keys) == ["batch.eval_2", "team-a"]
    assert all(len(digest) == 32 for digest in keys.values())  # digests, not the keys


def test_parse_keys_reads_json_object_when_given_json() -> None:
    assert list(parse_keys(f'{{"team-a": "{KEY_A}"}}', "test")) == ["team-a"]


@pytest.mark.parametrize("text", ["", "# no keys yet\n", "{}"])
def test_parse_keys_returns_no_keys_when_text_is_empty(text: str) -> None:
    assert parse_keys(text, "test") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"- {KEY_A}\n", "expected a mapping of name: key, got a list"),
        (f"Team_A: {KEY_A}\n", "key name 'Team_A' must match"),
        (f"anonymous: {KEY_A}\n", "'anonymous' is reserved"),
        ("team-a: 123456789012345678901\n", "the key of 'team-a' is not a string; quote it"),
        ("team-a: short-key\n", "must be at least 16 characters"),
        ("team-a: 'sk-amalia aaaaaaaaaaaaaaaaaa'\n", "without whitespace"),
        (f"team-a: {KEY_A}\nteam-a: {KEY_B}\n", "key name 'team-a' is given twice (line 2)"),
        (f"team-a: {KEY_A}\nteam-b: {KEY_A}\n", "'team-a' and 'team-b' have the same key"),
    ],
)
def test_parse_keys_refuses_with_clear_error_when_text_is_invalid(text: str, message: str) -> None:
    with pytest.raises(ApiKeyError, match="^keys.yaml: ") as caught:
        parse_keys(text, "keys.yaml")
    assert message in str(caught.value)
    assert KEY_A not in str(caught.value) and KEY_B not in str(caught.value)


def test_parse_keys_names_only_position_when_yaml_is_broken() -> None:
    # PyYAML's own message would quote the line, and the line holds a key.
    with pytest.raises(ApiKeyError) as caught:
        parse_keys(f"team-a: {KEY_A}\nteam-b: {KEY_B}: oops\n", "keys.yaml")
    assert (
        str(caught.value)
        == "keys.yaml: not YAML at line 2, column 43; expected one `name: key` per line"
    )


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_bearer_extracts_token_only_when_scheme_is_bearer(
    header: str | None, token: str | None
) -> None:
    assert parse_bearer(header) == token


# === the check ===


def store_with(tmp_path: Path, text: str, **options: object) -> ApiKeyStore:
    path = tmp_path / "keys.yaml"
    path.write_text(text, encoding="utf-8")
    return ApiKeyStore(path, **options)


def test_authenticate_returns_key_name_when_key_is_valid(tmp_path: Path) -> None:
    store = store_with(tmp_path, f"team-a: {KEY_A}\nteam-b: {KEY_B}\n")
    assert store.authenticate(bearer(KEY_A)) == "team-a"
    assert store.authenticate(bearer(KEY_B)) == "team-b"


@pytest.mark.parametrize(
    ("header", "error"),
    [(None, MissingKey), ("Basic dXNlcjpwYXNz", MissingKey), (bearer(KEY_C), InvalidKey),
     (bearer(KEY_A[:-1]), InvalidKey), (bearer(KEY_A + "a"), InvalidKey)],
)  # fmt: skip
def test_authenticate_refuses_when_key_is_missing_or_wrong(
    tmp_path: Path, header: str | None, error: type[Exception]
) -> None:
    store = store_with(tmp_path, f"team-a: {KEY_A}\n")
    with pytest.raises(error) as caught:
        store.authenticate(header)
    assert KEY_A not in str(caught.value)


@pytest.mark.parametrize("header", [None, bearer(KEY_C)])
def test_authenticate_lets_request_through_as_anonymous_when_keys_not_required(
    tmp_path: Path, header: str | None
) -> None:
    store = store_with(tmp_path, f"team-a: {KEY_A}\n", required=False)
    assert store.authenticate(header) == ANONYMOUS
    assert store.authenticate(bearer(KEY_A)) == "team-a"


@pytest.mark.parametrize("token", [KEY_A, KEY_C, KEY_C[:5]], ids=["first-key", "no-key", "short"])
def test_identify_compares_every_key_in_equal_length_when_matching_or_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    store = store_with(tmp_path, f"team-a: {KEY_A}\nteam-b: {KEY_B}\nteam-c: '{'x' * 40}'\n")
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    store.identify(token)
    assert compared == [(32, 32)] * 3  # one comparison per key, no early exit, lengths never differ


# === sources and start-up ===


def test_store_refuses_to_start_when_key_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match="keys.yaml: No such file or directory"):
        ApiKeyStore(tmp_path / "keys.yaml")


def test_store_refuses_to_start_when_key_file_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match="keys.yaml: key name 'Bad' must match"):
        store_with(tmp_path, f"Bad: {KEY_A}\n")


def test_from_config_returns_none_when_no_key_source_configured() -> None:
    assert ApiKeyStore.from_config(AuthConfig()) is None


def test_from_config_merges_env_and_file_keys_when_both_given(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(f"team-a: {KEY_A}\n", encoding="utf-8")
    auth = AuthConfig(keys_file=str(tmp_path / "keys.yaml"), keys_env="AMALIA_API_KEYS")
    store = ApiKeyStore.from_config(auth, environ={"AMALIA_API_KEYS": f'{{"ops": "{KEY_B}"}}'})
    assert store is not None
    assert store.authenticate(bearer(KEY_A)) == "team-a"
    assert store.authenticate(bearer(KEY_B)) == "ops"


def test_from_config_refuses_when_env_and_file_share_a_name(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(f"ops: {KEY_A}\n", encoding="utf-8")
    auth = AuthConfig(keys_file=str(tmp_path / "keys.yaml"), keys_env="AMALIA_API_KEYS")
    with pytest.raises(
        ApiKeyError, match="key name 'ops' is in both env AMALIA_API_KEYS and API key file"
    ):
        ApiKeyStore.from_config(auth, environ={"AMALIA_API_KEYS": f"ops: {KEY_B}"})


def test_from_config_refuses_when_env_var_is_not_set() -> None:
    with pytest.raises(ApiKeyError, match="env AMALIA_API_KEYS .* is not set"):
        ApiKeyStore.from_config(AuthConfig(keys_env="AMALIA_API_KEYS"), environ={})


def test_auth_config_refuses_required_when_no_key_source() -> None:
    with pytest.raises(ValidationError, match="auth.required needs keys_file or keys_env"):
        AuthConfig(required=True)


# === reloads ===


def test_rewritten_file_takes_effect_after_reload_interval_when_changed(tmp_path: Path) -> None:
    clock = FakeClock()
    store = store_with(tmp_path, f"team-a: {KEY_A}\n", reload_interval_s=5.0, clock=clock)
    (tmp_path / "keys.yaml").write_text(f"team-b: {KEY_B}\n", encoding="utf-8")
    clock.now += 4.9
    assert (
        store.authenticate(bearer(KEY_A)) == "team-a"
    )  # not checked yet: at most one stat per interval
    clock.now += 0.2
    assert store.authenticate(bearer(KEY_B)) == "team-b"
    with pytest.raises(InvalidKey):
        store.authenticate(bearer(KEY_A))


def test_secret_volume_update_takes_effect_when_data_symlink_swapped(tmp_path: Path) -> None:
    clock = FakeClock()
    write_secret_volume(tmp_path, "2026_11_28_10_00_00.1", {"keys.yaml": f"team-a: {KEY_A}\n"})
    store = ApiKeyStore(tmp_path / "keys.yaml", reload_interval_s=1.0, clock=clock)
    first = (tmp_path / "keys.yaml").stat()
    write_secret_volume(tmp_path, "2026_11_28_10_01_00.2", {"keys.yaml": f"team-a: {KEY_B}\n"})
    # The name the store opens is the same unchanged symlink, and the file behind it has the same size
    # and mtime: an lstat or an mtime check would miss this update.
    os.utime(tmp_path / "keys.yaml", ns=(first.st_atime_ns, first.st_mtime_ns))
    assert (tmp_path / "keys.yaml").stat().st_size == first.st_size
    clock.now += 1.0
    assert store.authenticate(bearer(KEY_B)) == "team-a"
    with pytest.raises(InvalidKey):
        store.authenticate(bearer(KEY_A))


def test_old_keys_keep_working_when_new_file_is_invalid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = store_with(tmp_path, f"team-a: {KEY_A}\n", reload_interval_s=1.0, clock=clock)
    (tmp_path / "keys.yaml").write_text(
        f"team-a: {KEY_A}\nteam-b: {KEY_B}: broken\n", encoding="utf-8"
    )
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            clock.now += 1.0
            assert store.authenticate(bearer(KEY_A)) == "team-a"
    assert store.last_error is not None and "not YAML at line 2" in store.last_error
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert (
        len(errors) == 1 and "keeping the 1 keys loaded before" in errors[0]
    )  # once, not per check
    # Fixed: picked up, and the error clears.
    (tmp_path / "keys.yaml").write_text(f"team-a: {KEY_A}\nteam-b: {KEY_B}\n", encoding="utf-8")
    clock.now += 1.0
    assert store.authenticate(bearer(KEY_B)) == "team-b"
    assert store.last_error is None


def test_old_keys_keep_working_when_file_disappears(tmp_path: Path) -> None:
    clock = FakeClock()
    store = store_with(tmp_path, f"team-a: {KEY_A}\n", reload_interval_s=1.0, clock=clock)
    (tmp_path / "keys.yaml").unlink()
    clock.now += 1.0
    assert store.authenticate(bearer(KEY_A)) == "team-a"
    assert store.last_error is not None and "No such file or directory" in store.last_error


def test_logs_name_keys_but_never_contain_them_when_loading_reloading_and_refusing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.DEBUG):
        store = store_with(tmp_path, f"team-a: {KEY_A}\n", reload_interval_s=1.0, clock=clock)
        for text in (
            f"team-a: {KEY_A}\nteam-b: {KEY_B}\n",
            f"team-b: {KEY_B}: x\n",
            f"team-b: {KEY_B}\n",
        ):
            (tmp_path / "keys.yaml").write_text(text, encoding="utf-8")
            clock.now += 1.0
            store.reload_if_changed()
        with pytest.raises(InvalidKey):
            store.authenticate(bearer(KEY_C))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "team-a" in logged and "team-b" in logged
    for secret in ("aaaaaaaa", "bbbbbbbb", "cccccccc"):  # any part of any key
        assert secret not in logged
