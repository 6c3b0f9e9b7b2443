"""A line at the end of every test run naming the tests skipped for a missing browser, and how to
get it: ``python3 -m pytest -q`` (the README's command) would otherwise only count them."""

BROWSER = "chromium"
INSTALL = "sudo apt-get install -y chromium"


def browser_skips(terminalreporter) -> list:
    """Node ids of the skipped tests whose reason names the browser."""
    skipped = terminalreporter.stats.get("skipped", [])
    return [report.nodeid for report in skipped
            if BROWSER in str(getattr(report, "longrepr", "")).lower()]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    names = browser_skips(terminalreporter)
    if names:
        terminalreporter.write_line(
            f"{len(names)} test(s) skipped because Debian's chromium is not installed (the HTML report is "
            f"checked in a real browser): install it with `{INSTALL}` and run the tests again. Skipped: "
            + ", ".join(names), yellow=True, bold=True)
