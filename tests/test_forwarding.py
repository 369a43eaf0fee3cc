"""The gateway's batch splitter against a real nats-server, with paho-mqtt
standing in for a board: exactly once by the per-device mark (however late a
batch comes again), the ack a board waits for, gaps, malformed batches, and
one splitter at a time across gateway instances."""
from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import Iterator

import nats
import paho.mqtt.client as mqtt
import pytest
from nats.errors import ConnectionReconnectingError
from support import GatewayThread, stored_readings, wait_for

from fleet.gateway.forwarding import publish_chain
from fleet.broker.server import NatsServer
from fleet.wire import MalformedPayload, ReadingBatch


class StandInBoard:
    """Publishes batches as the firmware does and hears the gateway's acks."""

    def __init__(self, server: NatsServer, device_id: str) -> None:
        self.device_id = device_id
        self.acks: queue.Queue[int] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False)
        self.client.on_message = lambda c, u, m: self.acks.put(int(m.payload))
        self.client.connect(server.host, server.mqtt_port)
        self.client.loop_start()
        self.client.subscribe(f"fleet/{device_id}/ack", 0)[1]

    def send(
        self, seqs: list[int], dropped: int = 0, backlog: int = 0, raw: bytes | None = None, prev: int = -1, wait: bool = True
    ) -> mqtt.MQTTMessageInfo:
        records = [{"seq": s, "ts": 1.0 + s, "boot": 1, "temp_c": 20.0 + s} for s in seqs]
        batch = {"prev": prev, "dropped": dropped, "backlog": backlog, "records": records}
        payload = raw if raw is not None else json.dumps(batch).encode()
        sent = self.client.publish(f"fleet/{self.device_id}/batch", payload, qos=1)
        if wait:
            sent.wait_for_publish(5)
        return sent

    def ack_reaching(self, seq: int, timeout: float = 20.0) -> int:
        """Acks until one says `seq` is stored (several batches in flight)."""
        deadline = time.monotonic() + timeout
        while (got := self.acks.get(timeout=max(0.01, deadline - time.monotonic()))) < seq:
            pass
        return got

    def ack(self, timeout: float = 10.0) -> int:
        return self.acks.get(timeout=timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def board(server: NatsServer, gateway: GatewayThread) -> Iterator[StandInBoard]:
    stand_in = StandInBoard(server, "dev-1")
    wait_for(lambda: _subscribed(gateway), "the gateway", 5)
    try:
        yield stand_in
    finally:
        stand_in.close()


def _subscribed(gateway: GatewayThread) -> bool:
    return gateway.gateway.splitter is not None and gateway.gateway.splitter.leader


def seqs(server: NatsServer, device_id: str = "dev-1") -> list[int]:
    return [r.payload["seq"] for r in stored_readings(server.url, device_id)]  # type: ignore[index]


def test_each_record_is_stored_once_and_the_board_hears_the_last_sequence(board: StandInBoard, server: NatsServer) -> None:
    board.send([1, 2, 3])
    assert board.ack() == 3
    board.send([4, 5])
    assert board.ack() == 5
    assert seqs(server) == [1, 2, 3, 4, 5]


def test_a_batch_sent_again_long_after_is_not_stored_twice_but_acknowledged(
    board: StandInBoard, server: NatsServer, gateway: GatewayThread
) -> None:
    board.send([1, 2, 3])
    assert board.ack() == 3
    # Past any duplicate window: only the mark can tell (a board whose ack got lost).
    board.send([2, 3, 4])
    assert board.ack() == 4
    board.send([1, 2, 3, 4])
    assert board.ack() == 4
    assert seqs(server) == [1, 2, 3, 4]
    state = gateway.forwarding("dev-1")
    assert state is not None and state.duplicates == 2 + 4 and state.forwarded == 4


def test_readings_dropped_on_the_board_show_as_a_counted_gap(board: StandInBoard, gateway: GatewayThread) -> None:
    board.send([1, 2], dropped=0)
    board.ack()
    board.send([40, 41], dropped=37, backlog=5)
    board.ack()
    state = gateway.forwarding("dev-1")
    assert state is not None
    assert state.dropped == 37 and state.gaps == [{"after_seq": 2, "dropped": 37}] and state.backlog == 5


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1, 2]", b'{"records": 5}', b'{"dropped": -1, "records": []}', b"\xff\xfe"],
)
def test_a_malformed_batch_is_counted_and_the_next_one_still_goes_through(
    board: StandInBoard, server: NatsServer, gateway: GatewayThread, raw: bytes
) -> None:
    board.send([], raw=raw)
    board.ack()
    board.send([7, 8])
    assert board.ack() == 8
    assert seqs(server) == [7, 8]
    state = gateway.forwarding("dev-1")
    assert state is not None and state.malformed == 1


def test_a_record_without_a_sequence_is_left_out_and_counted(board: StandInBoard, server: NatsServer, gateway: GatewayThread) -> None:
    board.send([], raw=b'{"dropped": 0, "records": [{"seq": 1}, {"temp_c": 3}, "x", {"seq": 2}]}')
    assert board.ack() == 2
    assert seqs(server) == [1, 2]
    state = gateway.forwarding("dev-1")
    assert state is not None and state.malformed == 2


def test_batches_in_flight_together_are_stored_in_order_exactly_once(board: StandInBoard, server: NatsServer) -> None:
    # A board keeps several batches in flight: the splitter takes them in
    # rounds, and a resend of the first ones among them changes nothing.
    sent = [board.send(list(range(first, first + 7)), prev=first - 1, wait=False) for first in range(0, 350, 7)]
    sent.append(board.send(list(range(0, 14)), wait=False))  # the board's cursor went back: sent again
    for message in sent:
        message.wait_for_publish(5)
    assert board.ack_reaching(349) == 349
    assert seqs(server) == list(range(350))


def test_a_batch_after_one_that_never_reached_the_stream_stores_nothing_until_the_board_resends(
    board: StandInBoard, server: NatsServer, gateway: GatewayThread
) -> None:
    board.send([1, 2])
    assert board.ack() == 2
    # The batch with 3-5 was acknowledged by the broker and then lost; the
    # next one says it follows 5: storing it would skip 3-5 for good.
    board.send([6, 7], prev=5)
    assert board.ack() == 2
    assert seqs(server) == [1, 2]
    board.send([3, 4, 5], prev=2)  # the board, never acked, sends from its cursor
    board.send([6, 7], prev=5)
    assert board.ack_reaching(7) == 7
    assert seqs(server) == [1, 2, 3, 4, 5, 6, 7]
    state = gateway.forwarding("dev-1")
    assert state is not None and state.holes == 1


def test_a_record_stored_by_someone_else_between_rounds_breaks_the_chain_and_the_round_goes_again(
    board: StandInBoard, server: NatsServer, gateway: GatewayThread
) -> None:
    board.send([1, 2])
    assert board.ack() == 2

    async def foreign() -> None:
        nc = await nats.connect(server.url)
        try:
            await nc.jetstream().publish("fleet.dev-2.telemetry", b'{"seq": 1}')
        finally:
            await nc.close()

    asyncio.run(foreign())
    board.send([3, 4])
    assert board.ack() == 4
    assert seqs(server) == [1, 2, 3, 4]
    splitter = gateway.gateway.splitter
    assert splitter is not None and splitter.counters.failed >= 1  # the chain noticed


def test_batches_parse_into_records_with_their_own_bytes() -> None:
    batch = ReadingBatch.parse(b'{"dropped": 3, "backlog": 9, "records": [{"seq": 5, "t": 1.5}]}')
    assert batch.dropped == 3 and batch.backlog == 9
    assert [(r.seq, json.loads(r.raw)) for r in batch.records] == [(5, {"seq": 5, "t": 1.5})]
    with pytest.raises(MalformedPayload):
        ReadingBatch.parse(b'{"dropped": true, "records": []}')


def test_the_firmware_layout_keeps_each_record_as_sent_and_a_corrupt_one_costs_only_itself() -> None:
    # As firmware/device.py lays a batch out: one record per line, indented
    # (each record's frame header on flash became ",\n    ").
    sent = b'{"prev": 4, "dropped": 0, "backlog": 7, "records": [\n    {"seq": 5, "t": 1.5},\n    {"seq": 6,  "t": 2.0}\n]}'
    batch = ReadingBatch.parse(sent)
    assert (batch.prev, batch.backlog, batch.malformed) == (4, 7, 0)
    assert [(r.seq, r.raw) for r in batch.records] == [(5, b'{"seq": 5, "t": 1.5}'), (6, b'{"seq": 6,  "t": 2.0}')]
    # Not indented, as earlier firmware sent it: the same records.
    flat = ReadingBatch.parse(sent.replace(b"\n    ", b"\n"))
    assert [(r.seq, r.raw) for r in flat.records] == [(r.seq, r.raw) for r in batch.records] and flat.malformed == 0
    # A torn record is not JSON, so neither is the batch: the others still go.
    torn = sent.replace(b'{"seq": 5, "t": 1.5}', b'{"seq": 5, "t"')
    batch = ReadingBatch.parse(torn)
    assert batch.malformed == 1 and [r.seq for r in batch.records] == [6]
    # A record that is not UTF-8, or not a reading, costs only itself too.
    for bad in (b'{"seq": 5, "t": "\xff"}', b'{"seq": 5, "temp_c": true}', b'{"seq": -5}', b'[5]',
                b'{"seq": 5, "t": NaN}'):
        batch = ReadingBatch.parse(sent.replace(b'{"seq": 5, "t": 1.5}', bad))
        assert batch.malformed == 1 and [r.seq for r in batch.records] == [6], bad
    # JSON laid out otherwise that happens to start and end like it: parsed whole.
    nested = b'{"records": [\n{"seq": 1, "a": [\n1\n]},\n{"seq": 2}\n]}'
    batch = ReadingBatch.parse(nested)
    assert batch.malformed == 0 and [r.seq for r in batch.records] == [1, 2]
    assert json.loads(batch.records[0].raw) == {"seq": 1, "a": [1]}


def test_only_one_gateway_splits_and_the_other_takes_over_when_it_stops(server: NatsServer) -> None:
    first = GatewayThread(server.url).__enter__()
    second = GatewayThread(server.url).__enter__()
    try:
        splitters = [first.gateway.splitter, second.gateway.splitter]
        wait_for(lambda: any(s is not None and s.leader for s in splitters), "a lease holder", 10)
        assert sum(1 for s in splitters if s is not None and s.leader) == 1
        holder, other = (first, second) if first.gateway.splitter.leader else (second, first)  # type: ignore[union-attr]
        board = StandInBoard(server, "dev-2")
        try:
            board.send([1, 2])
            assert board.ack() == 2
            holder.__exit__(None, None, None)
            wait_for(lambda: other.gateway.splitter is not None and other.gateway.splitter.leader, "a new holder", 15)
            board.send([3])
            assert board.ack() == 3
            assert seqs(server, "dev-2") == [1, 2, 3]
        finally:
            board.close()
    finally:
        for running in (first, second):
            if running.thread.is_alive():
                running.__exit__(None, None, None)


def test_a_round_is_not_queued_while_the_connection_is_away(server: NatsServer) -> None:
    # The splitter writes a round's records itself, past nats-py's publish()
    # and its limit on what may wait for a reconnect: while the connection
    # is away it refuses the round (tried again later) and queues nothing.
    async def scenario() -> None:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            await nc.jetstream().add_stream(name="CHAIN", subjects=["chain"])
            last, seq = await publish_chain(nc, [("chain", b"{}", f"c:{n}") for n in range(3)], None, 5)
            assert (last, seq) == ("c:2", 3)
            server.stop()
            deadline = time.monotonic() + 10
            while nc.is_connected:
                assert time.monotonic() < deadline, "nats-py never noticed the server gone"
                await asyncio.sleep(0.05)
            with pytest.raises(ConnectionReconnectingError):
                await publish_chain(nc, [("chain", b"{}", f"c:{n}") for n in range(3, 6)], last, 1)
            assert nc._pending_data_size == 0  # pyright: ignore[reportPrivateUsage]
        finally:
            await nc.close()

    asyncio.run(scenario())
