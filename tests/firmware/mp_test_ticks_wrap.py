# The firmware's interval arithmetic across the tick counter's wrap, with the
# 2^30 period of a 32-bit board (wrap30/time.py, first on the path, starts
# the counter 300 ms before the wrap). Only code that runs without asyncio:
# see wrap30/time.py.
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0] + "/wrap30")

import errno  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import utime  # noqa: E402
from backlog import BacklogLog  # noqa: E402
from mqttsocket import PacketSocket  # noqa: E402


def test_the_firmware_sees_a_counter_that_wraps_during_the_test():
    import backlog
    import mqttsocket

    assert backlog.ticks_ms is time.ticks_ms and mqttsocket.ticks_ms is time.ticks_ms
    before = time.ticks_ms()
    assert before > time.PERIOD - 400
    utime.sleep_ms(400)
    assert time.ticks_ms() < 400  # wrapped
    assert time.ticks_diff(time.ticks_ms(), before) >= 400


def test_a_flush_falls_due_on_time_across_the_wrap():
    log = BacklogLog(flush_records=100, flush_ms=400)
    log.append(b'{"seq": 1}')  # just before the wrap
    utime.sleep_ms(150)
    assert not log.flush_due()
    utime.sleep_ms(350)  # the counter wrapped in between
    assert log.flush_due()


def test_a_socket_read_times_out_on_time_across_the_wrap():
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for port in range(47311, 47411):
        try:
            server.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
            break
        except OSError:
            pass
    server.listen(1)
    sock = PacketSocket(500, 4096)
    sock.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    started = utime.ticks_ms()
    try:
        sock.read(4)  # nothing comes: the deadline falls after the wrap
        raise AssertionError("read returned without data")
    except OSError as e:
        assert e.errno == errno.ETIMEDOUT, e
    waited = utime.ticks_diff(utime.ticks_ms(), started)
    assert 450 <= waited < 2000, waited
    sock.close()
    server.close()
