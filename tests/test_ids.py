"""Request ids and lease tokens: unique in a process, and after a fork."""

from __future__ import annotations

import os

from stepflow.store.ids import new_request_id, new_token


def test_ids_never_repeat_and_stay_hex() -> None:
    ids = [new_request_id() for _ in range(10_000)] + [new_token() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(int(value, 16) >= 0 for value in ids)  # no '|' or '#': they sit in step lines


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    before = new_request_id()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once, whatever happens
        try:
            os.write(write_end, new_request_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_id = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    parent_id = new_request_id()
    # Same prefix would mean the child counts on from the parent's state: it could
    # hand out exactly the ids the parent hands out next.
    assert child_id[:16] != before[:16]
    assert parent_id[:16] == before[:16]
