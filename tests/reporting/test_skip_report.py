"""The README's test command says which tests were skipped for a missing browser, and how to get it."""

from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]


def test_a_browser_skip_is_named_with_the_install_command(pytester):
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                          "from tests.skip_report import pytest_terminal_summary\n")
    pytester.makepyfile(test_page="""
        import pytest

        @pytest.mark.skipif(True, reason="Debian's chromium is not installed")
        def test_in_the_browser():
            pass

        @pytest.mark.skipif(True, reason="no GPU")
        def test_on_a_gpu():
            pass

        def test_plain():
            pass
    """)
    output = pytester.runpytest("-q").stdout.str()
    line = next(line for line in output.splitlines() if "chromium is not installed" in line)
    assert line.startswith("1 test(s) skipped") and "sudo apt-get install -y chromium" in line
    assert "test_page.py::test_in_the_browser" in line and "test_on_a_gpu" not in line


def test_nothing_is_said_when_no_browser_test_was_skipped(pytester):
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                          "from tests.skip_report import pytest_terminal_summary\n")
    pytester.makepyfile(test_page="def test_plain():\n    pass\n")
    assert "chromium" not in pytester.runpytest("-q").stdout.str()
