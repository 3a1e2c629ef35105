"""
Writing to a TCP transport without waiting for the next reactor turn.

Twisted's C{transport.write} only queues: it asks epoll to report the
socket writable (one C{epoll_ctl}), sends when the next poll says so, and
stops watching again (another C{epoll_ctl}).  A relayed SSE chunk or a
small answer therefore costs two system calls and a reactor pass more than
the send itself.  L{write_now} sends at once when nothing is queued on the
transport, and hands whatever the kernel did not take to C{write}, which
keeps ordering, buffering and producer backpressure as Twisted does them.

This reads Twisted's C{FileDescriptor} internals (C{socket}, C{dataBuffer},
C{offset}, C{_tempDataBuffer}, C{_writeDisconnected}); setup.py pins the
Twisted range the tests run on.  Only a plain TCP or Unix connection is
written to directly.  A TLS connection's protocol is given a
C{TLSMemoryBIOProtocol} as its transport, which forwards unknown
attributes (C{socket} among them) to the TCP connection underneath: it
takes the ordinary path, or the bytes would bypass the encryption.
"""

from twisted.internet.tcp import Connection


def write_now(transport, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it at once if nothing is queued.
    """
    if (
        not isinstance(transport, Connection)
        or transport.TLS
        or transport._tempDataBuffer
        or len(transport.dataBuffer) != transport.offset
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let the transport meet the error on its own write.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])
