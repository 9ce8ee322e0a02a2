#!/usr/bin/env python3
"""A plain pre-fork server for the netns tier: a parent that forks N children
which all accept on the inherited socket (fd 3, LISTEN_FDS=1), as many real
servers do. Each answer is `portfleet listener=L shard=S pid=P` (the reference
worker's body, so the load generator counts answers per pid).

How it stops is chosen by flags, to reproduce the servers that leave their
children behind:
  --parent-on-term=wait   SIGTERM: tell the children (SIGTERM), wait for them,
                          plus --term-delay seconds, then exit (a slow server).
  --parent-on-term=exit   SIGTERM: tell the children and exit at once, without
                          waiting (the children are left to finish alone).
  --child-on-term=exit    a child finishes the connection in hand and exits.
  --child-on-term=linger  a child keeps serving for --linger seconds, then
                          exits (a child that does not check).
A child that dies is forked again by the parent (as pre-fork servers do).
"""
import argparse
import os
import select
import signal
import socket
import sys
import time


def serve_child(sock, args, listener, shard):
    stop_at = [None]

    def on_term(_sig, _frame):
        # Either way the connection in hand is finished first.
        if stop_at[0] is None:
            stop_at[0] = time.monotonic() + (
                args.linger if args.child_on_term == "linger" else 0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    body = "portfleet listener=%s shard=%s pid=%d" % (listener, shard,
                                                      os.getpid())
    answer = ("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
              "Connection: close\r\n\r\n%s" % (len(body), body)).encode()
    sock.setblocking(False)
    while True:
        if stop_at[0] is not None and time.monotonic() >= stop_at[0]:
            os._exit(0)
        try:
            ready, _, _ = select.select([sock], [], [], 0.1)
        except InterruptedError:
            continue
        if not ready:
            continue
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            # The socket was shut down (the agent does that to an old
            # version's socket in a rollout): a child that does not check
            # just idles until it is told or killed.
            time.sleep(0.1)
            continue
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data:
                conn.sendall(answer)
                conn.shutdown(socket.SHUT_WR)
                # Wait for the client's FIN so that our close never resets.
                while conn.recv(4096):
                    pass
        except OSError:
            pass
        finally:
            conn.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--children", type=int, default=2)
    p.add_argument("--parent-on-term", choices=["wait", "exit"], default="wait")
    p.add_argument("--term-delay", type=float, default=0.0)
    p.add_argument("--child-on-term", choices=["exit", "linger"],
                   default="exit")
    p.add_argument("--linger", type=float, default=30.0)
    p.add_argument("--version", default="1")  # only to tell versions apart
    p.add_argument("--tag", default="")  # only to find its processes
    args = p.parse_args()
    if os.environ.get("LISTEN_FDS") != "1":
        sys.exit("prefork_worker: needs LISTEN_FDS=1 (socket on fd 3)")
    listener = os.environ.get("PORTFLEET_LISTENER", "?")
    shard = os.environ.get("PORTFLEET_SHARD", "0")
    sock = socket.socket(fileno=3)
    children = set()

    def fork_child():
        pid = os.fork()
        if pid == 0:
            serve_child(sock, args, listener, shard)
            os._exit(0)
        children.add(pid)

    class Stop(Exception):
        pass

    def on_term(_sig, _frame):
        raise Stop()

    # Python retries an interrupted waitpid: the handler raises to end it.
    signal.signal(signal.SIGTERM, on_term)
    try:
        for _ in range(args.children):
            fork_child()
        while True:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.1)
                continue
            if pid in children:
                children.discard(pid)
                fork_child()
    except Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if args.parent_on_term == "exit":
        os._exit(0)
    while children:
        try:
            pid, _ = os.waitpid(-1, 0)
            children.discard(pid)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    time.sleep(args.term_delay)
    os._exit(0)


if __name__ == "__main__":
    main()
