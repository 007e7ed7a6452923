"""The test harness itself: shared data is skipped locally but required under CI=true."""

import pytest
from conftest import require_shared


def test_missing_shared_data_skips_locally(tmp_path):
    with pytest.raises(pytest.skip.Exception, match="shared data not found"):
        require_shared(tmp_path / "nope", {})


def test_missing_shared_data_fails_under_ci(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="CI=true: .* data tests must run in CI"):
        require_shared(tmp_path / "nope", {"CI": "true"})
    assert require_shared(tmp_path, {"CI": "true"}) == tmp_path


def test_ci_output_lists_the_slowest_tests():
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "--durations=15" in cfg["tool"]["pytest"]["ini_options"]["addopts"]
