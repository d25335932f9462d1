"""The CI skip policy in conftest.py, run by pytest's own `pytester` on a copy of that conftest."""
from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

SKIPPING_TESTS = """
import pytest

@pytest.fixture
def weights():
    pytest.skip("the weights are not installed")

def test_passes():
    pass

def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

def test_skips_in_its_body():
    pytest.skip("some-package is not installed")

@pytest.mark.skipif(True, reason="data files absent")
def test_skipped_by_a_marker():
    pass

def test_skipped_by_a_fixture(weights):
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def run(pytester, monkeypatch):
    def run(ci: str | None, **files):
        pytester.makeconftest(CONFTEST)
        pytester.makepyfile(**files)
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        return pytester.runpytest("-rfEs")   # as pyproject.toml's addopts
    return run


def test_under_ci_only_allowed_skips_pass(run):
    result = run("true", test_example=SKIPPING_TESTS)
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=2, xfailed=1)
    result.stdout.fnmatch_lines([
        "FAILED *::test_skips_in_its_body - *::test_skips_in_its_body skipped under CI "
        "(some-package is not installed); that reason is not on the allow-list CI_ALLOWED_SKIPS*",
        "ERROR *::test_skipped_by_a_marker - *(data files absent); that reason is not on the allow-list*",
        "ERROR *::test_skipped_by_a_fixture - *(the weights are not installed); that reason is not on*",
        "SKIPPED * needs a CUDA GPU",
    ])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_a_module_skipped_at_import_is_a_collection_error_under_ci(run):
    result = run("true", test_module='import pytest\npytest.importorskip("no_such_module_anywhere")\n')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["ERROR test_module.py - test_module.py skipped under CI "
                                 "(could not import 'no_such_module_anywhere'*not on the allow-list*"])
    assert result.ret != pytest.ExitCode.OK


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_skips_stay_skips(run, ci):
    result = run(ci, test_example=SKIPPING_TESTS)
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
