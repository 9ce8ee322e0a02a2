#!/usr/bin/env python3
"""A server that binds its own SO_REUSEPORT socket, as the SO_REUSEPORT
article's Python example does: create a socket, set SO_REUSEPORT, bind the
shared port, listen, accept in a loop. It knows nothing of portfleet: it
reads the port from PORT (portfleet sets it for self-bound workers), and its
answer names its pid (the netns tests count answers per process).

Flags exist only for the refusal tests: --host binds another address,
--no-reuseport leaves SO_REUSEPORT unset.
"""
import os
import socket
import sys

host = "0.0.0.0"
reuseport = True
for arg in sys.argv[1:]:
    if arg.startswith("--host="):
        host = arg[len("--host="):]
    elif arg == "--no-reuseport":
        reuseport = False
port = int(os.environ.get("PORT", "8080"))

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
if reuseport:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind((host, port))
sock.listen(128)

body = ("portfleet listener=%s shard=%s pid=%d\n" % (
    os.environ.get("PORTFLEET_LISTENER", "reuseport"),
    os.environ.get("PORTFLEET_SHARD", "0"), os.getpid())).encode()
answer = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
          b"Connection: close\r\n\r\n" % len(body)) + body
while True:
    conn, _ = sock.accept()
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = conn.recv(4096)
        if not chunk:
            break
        request += chunk
    conn.sendall(answer)
    conn.close()
