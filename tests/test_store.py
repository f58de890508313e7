"""sweep.store.store.Store on a real MLflow sqlite store: a call retries a lock error itself, within its bounds, and
raises any other error at once. The lock errors are injected into a real client, as test_claims interleaves one:
sqlite itself waits out a real lock for 20 s (MLflow's busy_timeout) before it reports one."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweep.store import tracking
from sweep.store.store import Store


class LockedFor(MlflowClient):
    """A real client whose set_tag finds the database locked on its first `times` calls, as a busy sqlite file does."""

    def __init__(self, uri: str, times: int):
        super().__init__(uri)
        self.times, self.calls = times, 0

    def set_tag(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.times:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return super().set_tag(*args, **kwargs)


def _new_run(uri: str) -> str:
    store = Store(uri)
    return store.create_run(tracking.get_or_create_experiment(store, "store-test"), tags={}).info.run_id


def test_a_call_rides_out_a_locked_database_with_no_wrapper_around_it(sqlite_uri):
    run_id = _new_run(sqlite_uri)
    client = LockedFor(sqlite_uri, times=2)
    Store(client).set_tag(run_id, "k", "v")
    assert client.calls == 3
    assert MlflowClient(sqlite_uri).get_run(run_id).data.tags["k"] == "v"


def test_the_retry_is_bounded_and_a_bounded_store_shares_the_client(sqlite_uri):
    run_id = _new_run(sqlite_uri)
    client = LockedFor(sqlite_uri, times=5)
    store = Store(client)
    with pytest.raises(MlflowException, match="locked"):
        store.bounded(3, 60.0).set_tag(run_id, "k", "v")  # a lease's bounds: give up after 3 attempts
    assert client.calls == 3 and "k" not in store.get_run(run_id).data.tags
    store.set_tag(run_id, "k", "v")  # the default bounds outlast the two lock errors left
    assert client.calls == 6 and store.get_run(run_id).data.tags["k"] == "v"


def test_any_other_error_is_raised_at_once(sqlite_uri):
    client = LockedFor(sqlite_uri, times=0)
    with pytest.raises(MlflowException) as error:
        Store(client).set_tag("0" * 32, "k", "v")  # no such run
    assert "locked" not in str(error.value).lower()
    assert client.calls == 1


def test_of_keeps_a_store_and_builds_one_from_a_uri_or_a_client(sqlite_uri):
    store = Store(sqlite_uri)
    assert Store.of(store) is store
    client = MlflowClient(sqlite_uri)
    assert Store.of(client).client is client
    assert Store.of(sqlite_uri).tracking_uri == sqlite_uri
