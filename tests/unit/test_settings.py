from __future__ import annotations

import pytest

from serve_app.errors import ConfigError
from serve_app.settings import Settings, load_settings


def test_code_defaults_match_the_seed_document() -> None:
    s = load_settings(env={})
    assert (s.port, s.max_queue_size, s.job_timeout_ms, s.host) == (3003, 100, 300_000,
                                                                     "127.0.0.1")


def test_the_environment_overrides_yaml_args() -> None:
    env = {"PORT": "8080", "MAX_CONCURRENT_JOBS": "2", "MODEL_PATH": "/w",
           "MAX_QUEUE_SIZE": "7", "JOB_TIMEOUT": "60000", "ENABLE_NSFW_FILTER": "true"}
    s = load_settings({"port": 9000, "max_queue_size": 50}, env=env)
    assert (s.port, s.max_concurrent_jobs, s.model_path, s.max_queue_size) == (
        8080, 2, "/w", 7)
    assert s.job_timeout_ms == 60_000 and s.enable_nsfw_filter is True


def test_yaml_args_override_code_defaults() -> None:
    assert load_settings({"max_queue_size": 50}, env={}).max_queue_size == 50


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(env={"MAX_QUEUE_SIZE": "lots"})
    assert "environment variable MAX_QUEUE_SIZE" in str(exc.value)


def test_unknown_setting_in_yaml_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_queue"):
        load_settings({"max_queue": 5}, env={})


def test_settings_are_plain_data() -> None:
    s = Settings()
    assert Settings.model_validate(s.model_dump()) == s
