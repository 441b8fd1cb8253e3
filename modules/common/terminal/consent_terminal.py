"""Consent questions as plain terminal questions: the CLI modules' ``IConsentUI``.

``TerminalConsentUI(input_stream, output_stream)`` writes each question to the output stream
("Allow the supporter to control your mouse and keyboard? [y/N] ") and reads one answer line per
question from the input stream — ``/dev/tty``, or a descriptor given on the command line, so a test
or a wrapper scripts the answers through the same interface a GUI implements (there is no flag that
grants everything).  "y", "yes", "j" and "ja" mean yes; anything else, an empty line or the end of
the input means no.

Questions are put one at a time, in order; a question that is withdrawn (its Deferred cancelled,
e.g. it timed out) is marked as answered "no" on the screen and the next one is put.  On a
terminal nothing typed before a question was on the screen answers it: pending input is flushed
when a question is shown, and a line typed for a question that was withdrawn meanwhile is
dropped.  From a pipe or a file of scripted answers the lines are simply taken in order.

Reading blocks, so it runs in one daemon thread of this object's own (not the shared blocking
pool: a read from a terminal may wait for as long as the person hesitates, and the pool's
shutdown joins its threads).  Answers come back to the reactor thread with ``callFromThread``.
"""

from __future__ import annotations

import os
import queue
import threading
import unicodedata
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from zope.interface import implementer

from modules.common.session.consent import Comment, Event, IConsentUI, Right, Role, SessionEnded, describe

YES = frozenset({"y", "yes", "j", "ja"})


def _printable(text: str) -> str:
    """Drop control characters (but newlines and tabs) so a peer's text cannot steer the
    terminal."""
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")


class _Question:
    def __init__(self, prompt: str, preamble: str = "") -> None:
        self.prompt = prompt
        self.preamble = preamble
        self.deferred: Deferred = Deferred(self._cancelled)
        self.shown = False
        self.ui: TerminalConsentUI | None = None

    def _cancelled(self, deferred: Deferred) -> None:
        if self.ui is not None:
            self.ui._withdraw(self)


@implementer(IConsentUI)
class TerminalConsentUI:
    """Terminal questions on ``output_stream``, answers from ``input_stream`` (text streams).
    ``me`` is the role of whoever sits at this terminal (for "you" in notices)."""

    def __init__(self, input_stream: TextIO, output_stream: TextIO, *,
                 me: Role | None = None, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811 - the installed reactor
        self._input = input_stream
        self._output = output_stream
        self._me = me
        self._reactor = reactor
        self._questions: list[_Question] = []
        self._reading_for: _Question | None = None  # the open question a line is being read for
        self._eof = False
        self._prompt_open = False  # a prompt is on the screen, waiting for its line
        self._requests: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        try:
            self._interactive = bool(input_stream.isatty())
        except (AttributeError, ValueError, OSError):
            self._interactive = False

    # --- IConsentUI ---------------------------------------------------------------------------

    def show_terms(self, text: str) -> Deferred:
        rule = "-" * 72
        preamble = f"\nSupport terms\n{rule}\n{_printable(text)}\n{rule}\n"
        return self._put(_Question("Do you accept these terms? [y/N] ", preamble))

    def ask(self, question: str, right: Right | None) -> Deferred:
        return self._put(_Question(f"{_printable(question)} [y/N] "))

    def notify(self, event: Event) -> None:
        if isinstance(event, (Comment, SessionEnded)):
            return  # comments belong to the protocol; the end is one line of the session's own
        line = describe(event, self._me)
        if not line:
            return
        if self._prompt_open:
            # keep the open question readable: the notice on its own line, then the prompt again
            self._write("\n" + _printable(line) + "\n" + self._questions[0].prompt)
        else:
            self._write(_printable(line) + "\n")

    # --- internals ----------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        self._output.write(text)
        self._output.flush()

    def _put(self, question: _Question) -> Deferred:
        question.ui = self
        if self._eof:
            self._write(question.preamble + question.prompt + "(no input: no)\n")
            question.deferred.callback(False)
            return question.deferred
        self._questions.append(question)
        self._next()
        return question.deferred

    def _next(self) -> None:
        """Show the oldest open question and make sure a line is being read for it."""
        if not self._questions:
            return
        head = self._questions[0]
        if not head.shown:
            head.shown = True
            if self._interactive:
                self._flush_typeahead()
            self._write(head.preamble + head.prompt)
            self._prompt_open = True
        if self._reading_for is None:
            self._reading_for = head
            self._read_one_line()

    def _flush_typeahead(self) -> None:
        try:
            import termios
            termios.tcflush(self._input.fileno(), termios.TCIFLUSH)
        except (ImportError, AttributeError, ValueError, OSError):
            pass

    def _withdraw(self, question: _Question) -> None:
        if question not in self._questions:
            return
        if question is self._questions[0] and question.shown:
            self._write("(no answer in time: no)\n")
            self._prompt_open = False
        self._questions.remove(question)
        self._next()

    def _read_one_line(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._reader, name="consent-terminal",
                                            daemon=True)
            self._thread.start()
        self._requests.put(True)

    def _reader(self) -> None:
        while self._requests.get():
            try:
                line = self._input.readline()
            except (OSError, ValueError):
                line = ""
            self._reactor.callFromThread(self._line, line)
            if not line:
                return

    def _line(self, line: str) -> None:
        meant_for, self._reading_for = self._reading_for, None
        self._prompt_open = False
        if not line:
            self._eof = True
            open_questions, self._questions = self._questions, []
            for question in open_questions:
                if not question.shown:
                    self._write(question.preamble + question.prompt)
                self._write("(no input: no)\n")
                question.deferred.callback(False)
            return
        if not self._questions or (self._interactive and self._questions[0] is not meant_for):
            # typed for a question that was withdrawn meanwhile: it answers nothing else
            self._next()
            return
        question = self._questions.pop(0)
        if not self._interactive:
            self._write(line if line.endswith("\n") else line + "\n")  # the script's answer
        question.deferred.callback(line.strip().lower() in YES)
        self._next()


def open_answers(source: str | None = None) -> TextIO:
    """The text stream answers are read from, for a CLI option such as ``--answers``: None is
    the controlling terminal (``/dev/tty``), digits are an inherited file descriptor, anything
    else a path (a FIFO or a file of scripted answers)."""
    if source is None:
        return open("/dev/tty", "r", encoding="utf-8", errors="replace")
    if source.isdigit():
        return os.fdopen(int(source), "r", encoding="utf-8", errors="replace")
    return open(source, "r", encoding="utf-8", errors="replace")


__all__ = ["TerminalConsentUI", "YES", "open_answers"]
