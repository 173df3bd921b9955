"""The one-line errors of the entry points, as the bad-input tests read them."""

from __future__ import annotations

import logging
import re
from typing import List

# what our handlers print once an entry point configured them: "HH:MM:SS E logger: message"
_PRINTED_ERROR = re.compile(r"^\d\d:\d\d:\d\d E \S+: (.*)$", re.M)


def error_lines(caplog, capfd) -> List[str]:
    """Error lines logged: captured by caplog, or printed on stderr once an entry point configured our loggers.
    Asserts that no traceback was printed."""
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    return msgs + _PRINTED_ERROR.findall(err)


def one_error(caplog, capfd) -> str:
    """The one error line (:func:`error_lines`); asserts there is exactly one."""
    msgs = error_lines(caplog, capfd)
    assert len(msgs) == 1, msgs
    return msgs[0]
