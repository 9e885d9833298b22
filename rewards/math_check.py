"""Math-Verify equivalence under a hard wall-clock limit: check_math(answer, gt, timeout_s) -> reason.

A model can answer "9^{9^{9}}" and sympy will compute for hours, so every check has a deadline. The checks run in
child processes of this one. A child lives across checks, so Math-Verify's caches and sympy's lazy imports stay
warm; one whose check outlasts the deadline is killed, and the next check forks a fresh one. A child dies with this
process, however it dies (kill -9 included), and leaves Ctrl-C to it. Unix only (fork).

    from rewards.math_check import check_math
    check_math("0.5", "\\frac{1}{2}", timeout_s=1.0)  # 'ok' ('wrong', 'unparsable', 'bad_gt', 'timeout', 'error')
"""

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from math_verify import parse as math_parse
from math_verify import verify as math_verify

# Why child processes and not a SIGALRM timer: a signal reaches only the main thread, so a timer cannot guard a
# check made by a worker thread (compute_rewards' pool, a caller's threads); it would displace any timer the caller
# set; and it waits for sympy to leave a long C call. A killed process stops wherever it is, whichever thread
# waits on it, under torchrun too (the child never touches the GPU). Math-Verify's own timeout is a SIGALRM timer
# in whole seconds, so it is off.
for _name in ("math_verify.grader", "math_verify.parser"):  # they warn that their timeout is off: ours is on
    logging.getLogger(_name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())

_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
_WARM_UP = (("0.5", "\\frac{1}{2}"), ("x+1", "\\{1, 2\\}"), ("[0,1)", "[0, 1)"), ("2^{1/2}", "\\sqrt{2}"),
            ("\\frac{2x+2}{2}", "x+1"))


def _parse(text: str) -> list:
    """math_verify.parse; text without LaTeX delimiters is read as inline math."""
    if not any(delimiter in text for delimiter in _LATEX_DELIMITERS):
        text = f"${text}$"
    return math_parse(text, parsing_timeout=None)


def _math_check(answer: str | None, gt: str) -> str:
    """'ok' | 'wrong' | 'unparsable' | 'bad_gt', with no time limit; answer None only checks that gt parses."""
    gold = _parse(gt)
    if not gold:
        return "bad_gt"
    if answer is None:
        return "ok"
    predicted = _parse(answer)
    if not predicted:
        return "unparsable"
    return "ok" if math_verify(gold, predicted, timeout_seconds=None) else "wrong"


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent dies


def _die_with_parent(parent_pid: int) -> None:
    """In a child: exit when the parent process `parent_pid` dies. On Linux the kernel sends SIGKILL (prctl's
    parent-death signal), which stops the child even inside a long sympy call; elsewhere a thread polls."""
    try:
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (AttributeError, OSError):  # no prctl: not Linux
        armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()


def _serve(connection, parent_pid: int) -> None:
    """The child's loop: (answer, gt) in, _math_check's reason out."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal group: it is the parent's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: a SIGTERM ends a child at once
    while True:
        try:
            answer, gt = connection.recv()
        except EOFError:  # the parent has gone
            return
        try:
            reason = _math_check(answer, gt)
        except Exception:  # sympy can fail in ways Math-Verify does not catch; the answer then scores 0
            reason = "error"
        connection.send(reason)


class _Checker:
    """One child process running _serve, and our end of the pipe to it. Create it through _fork_checker."""

    def __init__(self):
        context = multiprocessing.get_context("fork")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end, os.getpid()), daemon=True)
        self.process.start()
        child_end.close()

    def check(self, answer: str | None, gt: str, timeout_s: float) -> str:
        """The child's reason, or "timeout" / "error" once the child is killed or found dead (the pipe is then
        closed)."""
        try:
            self.connection.send((answer, gt))
            if self.connection.poll(timeout_s):
                return self.connection.recv()
            reason = "timeout"
        except (EOFError, OSError):  # the child died
            reason = "error"
        # Not joined: on a busy machine a killed child can wait a while for the CPU time to exit, and nothing here
        # needs it gone; multiprocessing reaps it when it starts the next child.
        self.process.kill()
        self.connection.close()
        return reason


# The kernel's parent-death signal follows the thread that forked the child, not the process: a child forked from
# compute_rewards' pool thread would be killed when the pool ends. So every child is forked from this one thread,
# which lives as long as the process.
_forker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="math-fork")


def _fork_checker() -> _Checker:
    return _forker.submit(_Checker).result()


_idle: list[_Checker] = []  # children no thread is using; one per thread that checks at the same time
_idle_lock = threading.Lock()
_warm = False


def warm_up() -> None:
    """Run a few checks in this process, once, before the first fork. A child forked from a cold process builds
    Math-Verify's parser and imports sympy's lazily loaded parts inside its first deadline, and can time out on
    "0.5"; forked from a warm one, it starts with all that done. check_math calls it; callers may call it first."""
    global _warm
    with _idle_lock:
        if not _warm:
            for answer, gt in _WARM_UP:
                _math_check(answer, gt)
            _warm = True


def check_math(answer: str | None, gt: str, timeout_s: float) -> str:
    """Whether `answer` is symbolically equal to `gt`, decided within timeout_s seconds of wall-clock time."""
    warm_up()
    with _idle_lock:
        checker = _idle.pop() if _idle else None
    checker = checker or _fork_checker()
    reason = checker.check(answer, gt, timeout_s)
    if not checker.connection.closed:  # closed: the child was killed or had died
        with _idle_lock:
            _idle.append(checker)
    return reason
