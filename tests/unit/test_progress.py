"""The status line long CLI jobs draw on stderr: in place on a terminal, throttled plain lines otherwise."""

from __future__ import annotations

import io

from sidecar.progress import Progress, StatusLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_redrawn_in_place_and_ended_once() -> None:
    out = Terminal()
    status = StatusLine(out)
    status.show("a")
    status.show("b")
    status.finish()
    status.finish()
    assert out.getvalue() == "\r\x1b[2Ka\r\x1b[2Kb\n"


def test_elsewhere_plain_lines_are_throttled_but_forced_ones_always_show() -> None:
    out = io.StringIO()
    status = StatusLine(out, plain_every=3600)
    status.show("first")
    status.show("dropped")
    status.show("state changed", force=True)
    status.finish()
    assert out.getvalue() == "first\nstate changed\n"


def test_progress_ends_with_its_final_count_in_a_pipe() -> None:
    out = io.StringIO()
    progress = Progress("dlq replay", total=3, stream=out)
    progress.advance()
    progress.advance(2)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("dlq replay  [") and "1/3" in lines[0]
    assert lines[-1].startswith("dlq replay  [") and "3/3" in lines[-1]
    assert len(lines) == 2  # throttled: the second advance drew nothing, finish drew the end
