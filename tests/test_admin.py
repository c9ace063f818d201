"""The operator endpoints when the server changes under a request (`dzjax.serving.admin`):
a delta unloaded meanwhile, a name taken by a concurrent load, the server closing, and loads
run one at a time. Driven with a stand-in server, so that each race happens on cue."""

import asyncio
import threading
import time

import pytest

from dzjax.errors import DzjaxError
from dzjax.serving.admin import Admin, warn_if_open
from dzjax.serving.openai_api import HTTPError, as_http_error
from dzjax.serving.requests import ModelNotFoundError, ServerClosedError


class Changing:
    """A server whose delta changes raise `error`, after `meanwhile()` (another request's
    change, landing just before)."""

    base_name = "base"

    def __init__(self, error=None, meanwhile=lambda names: None, seconds=0.0):
        self.names, self.error, self.meanwhile, self.seconds = ["ft"], error, meanwhile, seconds
        self.busy, self.most_busy, self.lock = 0, 0, threading.Lock()

    def models(self):
        return [self.base_name, *self.names]

    def _change(self, name):
        with self.lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        time.sleep(self.seconds)
        with self.lock:
            self.busy -= 1
        self.meanwhile(self.names)
        if self.error is not None:
            raise self.error

    def add_delta(self, name, path):
        self._change(name)
        self.names.append(name)

    def remove_delta(self, name):
        self._change(name)
        self.names.remove(name)


def answer(server, tmp_path, endpoint: str, body: dict) -> int:
    """The HTTP status `endpoint` answers `body` with."""
    (tmp_path / "d.dz").write_bytes(b"a delta file")
    admin = Admin(server, tmp_path, _body(body))
    try:
        response = asyncio.run(getattr(admin, endpoint)(None))
    except Exception as e:
        return as_http_error(e).status
    return response.status_code


def test_changes_racing_other_changes_or_a_closing_server_get_their_own_status(tmp_path):
    unload, load = {"name": "ft"}, {"name": "new", "path": "d.dz"}
    assert answer(Changing(), tmp_path, "unload_delta", unload) == 200
    assert answer(Changing(), tmp_path, "load_delta", load) == 200
    # unloaded by another request between the check and the change: 404, not a conflict
    gone = Changing(ModelNotFoundError("no delta named 'ft' is served"), lambda n: n.clear())
    assert answer(gone, tmp_path, "unload_delta", unload) == 404
    # requests run on it: 409
    assert answer(Changing(DzjaxError("in use by 2 running requests")), tmp_path,
                  "unload_delta", unload) == 409
    # the server closing: 503 (try another replica), for both
    closed = ServerClosedError("the server is closed")
    assert answer(Changing(closed), tmp_path, "unload_delta", unload) == 503
    assert answer(Changing(closed), tmp_path, "load_delta", load) == 503
    # a concurrent load of the same name won: the name is taken (400 on the name field)
    raced = Changing(DzjaxError("a delta named 'new' is already served"),
                     lambda n: n.append("new"))
    with pytest.raises(HTTPError) as e:
        asyncio.run(Admin(raced, tmp_path, _body(load)).load_delta(None))
    assert e.value.status == 400 and e.value.param == "name" and "already" in str(e.value)
    # a file that is no delta of this base: 400 on the path field
    with pytest.raises(HTTPError) as e:
        asyncio.run(Admin(Changing(DzjaxError("not a delta file")), tmp_path,
                          _body(load)).load_delta(None))
    assert e.value.status == 400 and e.value.param == "path"


def _body(body):
    async def read_json(request):
        return body
    return read_json


def test_loads_run_one_at_a_time(tmp_path):
    (tmp_path / "d.dz").write_bytes(b"a delta file")
    server = Changing(seconds=0.2)

    async def read(request):  # each call's "request" is its body
        return request
    admin = Admin(server, tmp_path, read)

    async def both():
        return await asyncio.gather(admin.load_delta({"name": "a", "path": "d.dz"}),
                                    admin.load_delta({"name": "b", "path": "d.dz"}))
    responses = asyncio.run(both())
    assert [r.status_code for r in responses] == [200, 200]
    assert server.names == ["ft", "a", "b"] and server.most_busy == 1
    # A second load of one name waits its turn, then is refused without reading the file.
    server = Changing(seconds=0.2)
    admin = Admin(server, tmp_path, read)

    async def same():
        return await asyncio.gather(admin.load_delta({"name": "a", "path": "d.dz"}),
                                    admin.load_delta({"name": "a", "path": "d.dz"}),
                                    return_exceptions=True)
    first, second = asyncio.run(same())
    assert first.status_code == 200 and isinstance(second, HTTPError)
    assert second.status == 400 and "already served" in str(second)
    assert server.names == ["ft", "a"] and server.most_busy == 1


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("[::1]", True),
                                             ("localhost", True), ("0.0.0.0", False),
                                             ("10.1.2.3", False), ("example.org", False)])
def test_an_unguarded_delta_dir_is_warned_of_off_loopback(host, loopback, caplog):
    warn_if_open(host, 8000, None, "deltas/")
    warn_if_open(host, 8000, "key", "deltas/")  # (a key: never warned)
    warn_if_open(host, 8000, None, None)  # (no delta dir: never warned)
    warned = [r for r in caplog.records if "can be loaded over HTTP" in r.getMessage()]
    assert len(warned) == (0 if loopback else 1)


def test_an_unloaded_deltas_series_stay_gone_until_it_is_served_again():
    """Its queued requests fail after the unload: they must not bring its series back."""
    from dzjax.serving.metrics import Metrics

    m = Metrics()
    series = lambda: {s.labels.get("model") for f in m.registry.collect() for s in f.samples}
    m.admitted("x", 5)
    m.finished("x", "stop", 0.5)
    assert "x" in series()
    m.forget("x")
    m.finished("x", "error", 0.1)  # a queued request failing later
    m.token("x", None)
    assert "x" not in series()
    m.served("x")
    m.finished("x", "stop", 0.2)
    assert "x" in series()
