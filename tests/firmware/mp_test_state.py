# Boot count and telemetry sequence survive reboots; flash is written once
# per block of sequence numbers, atomically.
import os

from state import DeviceState


def contents():
    with open("state.json") as f:
        return f.read()


def test_first_boot_starts_at_zero_and_counts_the_boot():
    state = DeviceState()
    state.boot()
    assert state.boots == 1 and state.next_seq() == 0 and state.next_seq() == 1


def test_sequence_keeps_increasing_across_reboots():
    state = DeviceState()
    state.boot()
    last = [state.next_seq() for _ in range(100)][-1]
    rebooted = DeviceState()
    rebooted.boot()
    assert rebooted.boots == 2
    assert rebooted.next_seq() > last


def test_flash_is_written_once_per_block_not_per_reading():
    state = DeviceState()
    state.boot()
    changes = 0
    before = contents()
    for _ in range(640):
        state.next_seq()
        now = contents()
        if now != before:
            changes += 1
            before = now
    assert changes == 640 // 64 - 1, changes  # the first block was reserved at boot


def test_no_temporary_file_is_left_behind():
    DeviceState().boot()
    assert sorted(os.listdir()) == ["state.json"]


def test_unreadable_state_gives_a_warning_not_a_crash():
    with open("state.json", "w") as f:
        f.write("garbage")
    state = DeviceState()
    state.boot()
    assert "unreadable" in state.warning
    assert state.boots == 1
