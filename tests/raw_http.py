"""Raw-socket HTTP/1.1 for tests whose client must do what no HTTP library would."""

from __future__ import annotations

import socket
from typing import BinaryIO


def read_response(reader: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One answer off the connection: its status, headers (names in lower case) and body."""
    status_line = reader.readline()
    if not status_line:
        raise EOFError("connection closed")
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, reader.read(int(headers.get("content-length", 0)))


def closed_once_read(sock: socket.socket) -> bool:
    """Reads what the socket still holds: True when the peer then closed or reset the connection,
    False when it stays open and silent for 30 seconds."""
    sock.settimeout(30)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True
