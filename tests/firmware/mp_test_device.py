# Pieces of the device that need no broker: the bounded inbox, the device
# id, the backoff schedule.
import os

from device import Inbox, device_id_from
from link import backoff_ms


def test_inbox_keeps_order_and_counts_what_it_drops():
    inbox = Inbox(3)
    for i in range(5):
        inbox.put(i)
    assert inbox.dropped == 2 and inbox.count == 3
    assert [inbox.get() for _ in range(3)] == [0, 1, 2]
    inbox.put(9)
    assert inbox.get() == 9


def test_device_id_comes_from_settings_when_given():
    assert device_id_from({"device_id": "kitchen-1"}) == "kitchen-1"


def test_device_id_is_derived_from_the_unique_id_otherwise():
    os.putenv("FLEET_SIM_UNIQUE_ID", "e66141040396a32c")
    assert device_id_from({"device_id": None}) == "sim-e66141040396a32c"


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    for attempt in range(20):
        ceiling = min(100 << attempt, 5000)
        samples = [backoff_ms(attempt, 100, 5000) for _ in range(50)]
        assert all(100 <= d <= ceiling for d in samples), (attempt, samples)
    assert len(set(backoff_ms(6, 100, 5000) for _ in range(50))) > 10  # jittered
    assert max(backoff_ms(30, 100, 5000) for _ in range(200)) > 2500  # reaches the cap's range


def test_an_older_micropython_is_named_and_a_newer_one_is_not():
    from device import too_old

    assert too_old("1.21", (1, 20, 0)) == "1.20.0"
    assert too_old("1.21", (1, 21, 0)) is None
    assert too_old("1.21", (1, 28, 0, "")) is None
    assert too_old("1.21", (2, 0, 0)) is None
