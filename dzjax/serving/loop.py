"""The engine's thread and inbox: how other threads hand the engine requests and calls, how it
runs, and how it stops (finishing what was accepted, or within a timeout), whatever a step is.

`EngineLoop` runs `_step()` over and over on its own thread, taking in the inbox between steps;
a subclass says what a step is (`_step`, `_busy`), what taking a request in means (`_accept`),
how to recover from a failed step (`_recover`) and how to fail everything when the thread ends
(`_fail_all`). Nobody ever waits for the thread forever: when it ends, for any reason, every
request still in it or in the inbox fails with `ServerClosedError`.
"""

from __future__ import annotations

import logging
import queue
import threading

from dzjax.serving.requests import ServerClosedError

log = logging.getLogger("dzjax.serving")


class EngineLoop:
    def __init__(self, name: str = "dzjax-engine"):
        self._inbox: queue.Queue = queue.Queue()
        self._closing = False
        self._abort: Exception | None = None  # set by close() when its timeout runs out
        self.stopped_by: Exception | None = None  # what the requests still there failed with
        self._close_called = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- what a subclass provides --------------------------------------------------------------

    def _step(self) -> bool:  # one step; whether it did anything
        raise NotImplementedError

    def _busy(self) -> bool:  # whether requests run or wait
        raise NotImplementedError

    def _accept(self, request) -> None:  # take a submitted request in
        raise NotImplementedError

    def _recover(self, error: Exception) -> None:  # after a failed step
        raise NotImplementedError

    def _fail_all(self, error: Exception, pending: list) -> None:  # fail running, waiting, pending
        raise NotImplementedError

    def _between_steps(self) -> None:  # after each turn of the loop (a step or an idle wait)
        pass

    # -- other threads -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _post(self, request) -> None:
        """Hand a request to the engine thread; refused once closing (never lost in between)."""
        with self._lock:
            if self._closing or not self.alive:
                raise ServerClosedError("the server is closed")
            self._inbox.put(("submit", request))

    def _wake(self) -> None:
        self._inbox.put(("wake", None))

    def call(self, fn, *args):
        """Run fn(*args) on the engine thread between steps; returns its result or raises."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["result"] = fn(*args)
            except Exception as e:
                box["error"] = e
            done.set()
        if not self.alive:
            raise ServerClosedError("the serving engine has stopped")
        self._inbox.put(("call", run))
        while not done.wait(0.1):
            if not self.alive:  # it stopped before reaching our call
                raise ServerClosedError("the serving engine has stopped")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def close(self, timeout: float | None = None) -> None:
        """Finish every accepted request, then stop; new requests are refused meanwhile. With a
        timeout, the requests still unfinished after it end with ServerClosedError, and close
        returns within about timeout + 1 s even if a step hangs (the thread is then abandoned)."""
        with self._lock:
            self._closing = self._close_called = True
            self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort = ServerClosedError(
                f"the server was closed before this request finished ({timeout:g} s)")
            self._wake()
            self._thread.join(1.0)
            if self._thread.is_alive():  # stuck in a step: fail the requests from here
                log.error("the engine did not stop within %.1f s; abandoning it", timeout + 1)
                self._fail_everything(self._abort)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        idle = False
        try:
            while True:
                busy = self._busy()
                if self._abort is not None or (self._closing and not busy and self._inbox.empty()):
                    return
                # Block briefly when there is nothing to do, or when the last step did nothing
                # (requests waiting for a disk read): no busy loop.
                self._drain_inbox(block=idle or not busy)
                try:
                    idle = not self._step()
                except Exception as e:  # fail the running requests, keep serving the others
                    log.exception("serving step failed")
                    self._recover(e)
                try:
                    self._between_steps()
                except Exception:  # (bookkeeping: it must not stop the engine)
                    log.exception("publishing the engine's state failed")
        finally:  # however the thread ends, nobody waits for it forever
            self._fail_everything(self._abort or ServerClosedError("the serving engine has stopped"))

    def _fail_everything(self, error: Exception) -> None:
        with self._lock:
            self._closing = True
            if self.stopped_by is None:
                self.stopped_by = error
        pending = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                pending.append(payload)
            elif kind == "call":
                payload()
        self._fail_all(error, pending)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._accept(payload)
            elif kind == "call":
                payload()
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
