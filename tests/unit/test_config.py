import pytest

from edged.config import load_config
from edged.errors import ConfigError


def test_defaults():
    config = load_config(None, environ={})
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)
    assert config.http.max_body_bytes == 64 * 1024 * 1024


def test_file_and_env_overrides(tmp_path):
    path = tmp_path / "edged.toml"
    path.write_text('models_dir = "m"\nthreads = 2\n[http]\nport = 9001\n')
    config = load_config(path, environ={"EDGED_HTTP_PORT": "9002", "EDGED_THREADS": "3"})
    assert config.http.port == 9002
    assert config.threads == 3
    assert config.models_path == tmp_path / "m"


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "edged.toml"
    path.write_text("[http]\nprot = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value) and "http.prot" in str(info.value)


def test_bad_value_names_key(tmp_path):
    path = tmp_path / "edged.toml"
    path.write_text('[http]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match="http.port: expected an integer"):
        load_config(path, environ={})


def test_bad_env_value_names_variable():
    with pytest.raises(ConfigError, match="EDGED_HTTP_PORT"):
        load_config(None, environ={"EDGED_HTTP_PORT": "x"})
