# The webassembly port has no socket module: a stand-in, only in that VM
# (tools/js/heap32.mjs), whose sockets are tests/firmware's ScriptedSocket
# and whose peer never answers. The unix port measures with its own.
from fakes import ScriptedSocket

AF_INET = 2
SOCK_STREAM = 1
SOL_SOCKET = 1
SO_REUSEADDR = 2


class socket(ScriptedSocket):
    def __init__(self, *args):
        super().__init__(b"")

    def setsockopt(self, *args):
        pass

    def setblocking(self, flag):
        pass

    def settimeout(self, seconds):
        pass

    def connect(self, address):
        raise OSError(111)  # ECONNREFUSED


def getaddrinfo(host, port, *args):
    return [(AF_INET, SOCK_STREAM, 0, "", (host, port))]
