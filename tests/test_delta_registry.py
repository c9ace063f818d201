"""How replicas on Ray Serve keep their deltas in step (`dzjax.serving.delta_registry`), without
Ray: the ingress's registry, and a replica's follower over a stand-in server that records what
it is asked to load and unload (the Ray tests run the real thing: `test_ray_serve.py`)."""

import asyncio
import threading

import pytest

from dzjax.errors import DzjaxError
from dzjax.serving.delta_registry import DeltaRegistry, Follower
from dzjax.serving.requests import ModelNotFoundError, ServerClosedError


class StandIn:
    """A server's delta calls: `calls` records them; `busy` names deltas with requests running,
    `unreadable` files that fail to read, `closed` makes every call fail as a closed server."""

    def __init__(self, deltas):
        self.served = dict(deltas)
        self.calls, self.busy, self.unreadable, self.closed = [], set(), set(), False

    def add_delta(self, name, path):
        self.calls.append(("add", name, path))
        if path in self.unreadable:
            raise DzjaxError(f"{path}: not a delta file")
        if name in self.served:
            raise DzjaxError(f"a delta named {name!r} is already served")
        self.served[name] = path

    def remove_delta(self, name):
        self.calls.append(("remove", name))
        if name not in self.served:
            raise ModelNotFoundError(f"no delta named {name!r} is served")
        if name in self.busy:
            raise DzjaxError(f"delta {name!r} is in use by 1 running requests")
        del self.served[name]

    def check_delta(self, name, path):
        if self.closed:
            raise ServerClosedError("the server is closed")
        if path in self.unreadable:
            raise DzjaxError(f"{path}: not a delta file")


def registry(checked=None):
    return DeltaRegistry("base", {"a": "/d/a.dz"}, lambda name, path: checked.append(path)
                         if checked is not None else None)


def run(coroutine):
    return asyncio.run(coroutine)


def test_the_registry_checks_before_it_serves_and_numbers_each_load():
    def check(name, path):
        if path.endswith("bad.dz"):
            raise DzjaxError("not a delta file")
    r = DeltaRegistry("base", {"a": "/d/a.dz"}, check)
    assert r.snapshot()[1:] == (0, (("a", "/d/a.dz", 0),))
    with pytest.raises(DzjaxError, match="not a delta"):
        r.add_delta("b", "/d/bad.dz")
    assert r.snapshot()[1] == 0 and r.models() == ["base", "a"]  # nothing half-applied
    r.add_delta("b", "/d/b.dz")
    r.remove_delta("b")
    r.add_delta("b", "/d/b.dz")  # the same file again: another load
    assert r.snapshot()[1:] == (3, (("a", "/d/a.dz", 0), ("b", "/d/b.dz", 3)))
    with pytest.raises(ModelNotFoundError):
        r.remove_delta("zzz")


def test_a_replica_follows_newer_states_and_not_an_older_one_arriving_late():
    r = registry()
    server = StandIn({"a": "/d/a.dz"})
    f = Follower(server, {"a": "/d/a.dz"}, "r1")
    old = r.snapshot()
    r.add_delta("b", "/d/b.dz")
    new = r.snapshot()
    run(f.sync(new))
    assert server.served == {"a": "/d/a.dz", "b": "/d/b.dz"}
    assert not f.due(old)  # sent before, arrived after: b stays
    run(f.sync(old))
    assert server.served == {"a": "/d/a.dz", "b": "/d/b.dz"}
    # A restarted ingress (another epoch) is followed whatever its version: back to `a`.
    restarted = registry().snapshot()
    assert f.due(restarted)
    run(f.sync(restarted))
    assert server.served == {"a": "/d/a.dz"}


def test_a_file_loaded_again_under_its_name_is_read_again():
    r = registry()
    server = StandIn({"a": "/d/a.dz"})
    f = Follower(server, {"a": "/d/a.dz"}, "r1")
    r.remove_delta("a")
    r.add_delta("a", "/d/a.dz")  # (replaced on disk in between)
    run(f.sync(r.snapshot()))
    assert server.calls == [("remove", "a"), ("add", "a", "/d/a.dz")]


def test_a_delta_in_use_is_freed_later_and_a_reload_waits_for_it():
    r = registry()
    server = StandIn({"a": "/d/a.dz"})
    server.busy = {"a"}
    f = Follower(server, {"a": "/d/a.dz"}, "r1", retry_free_s=0.0)
    r.remove_delta("a")
    r.add_delta("a", "/d/a2.dz")
    run(f.sync(r.snapshot()))
    assert server.served == {"a": "/d/a.dz"} and f.retiring == {"a"}
    why = run(f.unavailable("a"))  # its old weights are not served for the new file
    assert "loaded again" in why and "r1" in why
    assert f.due(r.snapshot())  # (tried again at the next request)
    server.busy = set()
    run(f.sync(r.snapshot()))
    assert server.served == {"a": "/d/a2.dz"} and not f.retiring
    assert run(f.unavailable("a")) is None


def test_a_delta_a_replica_cannot_read_is_refused_there_and_tried_again_when_asked_for():
    r = registry()
    server = StandIn({"a": "/d/a.dz"})
    server.unreadable = {"/d/b.dz"}
    f = Follower(server, {"a": "/d/a.dz"}, "r1")
    r.add_delta("b", "/d/b.dz")
    run(f.sync(r.snapshot()))
    reads = server.calls.count(("add", "b", "/d/b.dz"))
    run(f.sync(r.snapshot()))  # (not read again for other requests)
    assert server.calls.count(("add", "b", "/d/b.dz")) == reads == 1
    why = run(f.unavailable("b"))
    assert "could not be read on replica r1" in why and "not a delta file" in why
    server.unreadable = set()
    assert run(f.unavailable("b")) is None and server.served["b"] == "/d/b.dz"


def test_a_load_is_checked_on_a_replica_without_being_served_there():
    server = StandIn({})
    f = Follower(server, {}, "r1")
    assert run(f.check("b", "/d/b.dz")) is None and server.served == {}
    server.unreadable = {"/d/b.dz"}
    assert run(f.check("b", "/d/b.dz")) == ("invalid", "/d/b.dz: not a delta file")
    server.closed = True
    assert run(f.check("b", "/d/b.dz"))[0] == "closed"


def test_a_request_arriving_while_a_delta_is_read_waits_for_the_read():
    r = registry()
    server = StandIn({"a": "/d/a.dz"})
    reading, release = threading.Event(), threading.Event()
    add = server.add_delta

    def slow_add(name, path):
        reading.set()
        release.wait(10)
        add(name, path)
    server.add_delta = slow_add
    f = Follower(server, {"a": "/d/a.dz"}, "r1")
    r.add_delta("b", "/d/b.dz")
    state = r.snapshot()

    async def two_requests():
        first = asyncio.ensure_future(f.sync(state))
        await asyncio.to_thread(reading.wait, 10)
        assert f.due(state)  # the second request would sync too: it waits on the first
        second = asyncio.ensure_future(f.sync(state))
        release.set()
        await asyncio.gather(first, second)
        assert not f.due(state) and server.served["b"] == "/d/b.dz"
    run(two_requests())
    assert server.calls.count(("add", "b", "/d/b.dz")) == 1  # read once
