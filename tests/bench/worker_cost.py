#!/usr/bin/env python3
"""Deterministic cost of portfleet-worker's new-connection path.

Runs one `portfleet-worker --mode=http` on a listening socket made like an
agent's shard socket (SO_REUSEPORT, TCP_NODELAY, optionally
TCP_DEFER_ACCEPT), in a private network namespace, under `strace -c -f`
(syscalls per connection) or `valgrind --tool=callgrind` (instructions per
connection), while portfleet-loadgen opens a fixed number of connections
(one request each, "Connection: close", every answer checked). Counts do not
depend on how busy the machine is, so this works on a shared machine where
timings do not. Benchmarks are not run by CI. Run as root:

  tests/bench/worker_cost.py [--build BUILD_DIR] [--worker BINARY] [--conns 5000]
                             [--concurrency 8] [--defer-accept 0]
                             [--no-listener-nodelay] [--tool strace|callgrind]
                             [--keepalive]

Prints one Markdown table row per syscall (calls per connection) or the
instruction count per connection.
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))


def in_private_netns():
    """Re-executes this script in a new network namespace with lo up."""
    if os.environ.get("PORTFLEET_COST_NETNS") == "1":
        return
    env = dict(os.environ, PORTFLEET_COST_NETNS="1")
    cmd = ["unshare", "--net", "sh", "-c",
           'ip link set lo up && exec "$0" "$@"', sys.executable] + sys.argv
    sys.exit(subprocess.call(cmd, env=env))


def shard_socket(port, nodelay, defer):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if defer:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--build", default=os.path.join(TOP, "build"))
    p.add_argument("--worker", help="worker binary (default: from --build)")
    p.add_argument("--conns", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--defer-accept", type=int, default=0)
    p.add_argument("--no-listener-nodelay", action="store_true")
    p.add_argument("--tool", choices=["strace", "callgrind"], default="strace")
    p.add_argument("--keep", metavar="FILE",
                   help="keep the strace/callgrind output in FILE")
    p.add_argument("--keepalive", action="store_true",
                   help="long mode: 8 connections, requests on each")
    args = p.parse_args()
    in_private_netns()

    worker = args.worker or os.path.join(args.build, "worker",
                                         "portfleet-worker")
    loadgen = os.path.join(args.build, "tests", "portfleet-loadgen")
    port = 8099
    fd = shard_socket(port, not args.no_listener_nodelay,
                      args.defer_accept).detach()
    if fd != 3:
        os.dup2(fd, 3, inheritable=True)
        os.close(fd)
    os.set_inheritable(3, True)
    out = args.keep or tempfile.mktemp(prefix="worker-cost-")
    if args.tool == "strace":
        wrap = ["strace", "-c", "-f", "-o", out]
    else:
        wrap = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LISTEN_", "PORTFLEET_"))}
    env.update(LISTEN_FDS="1", PORTFLEET_LISTENER="cost")
    proc = subprocess.Popen(wrap + [worker, "--mode=http"], pass_fds=(3,),
                            env=env, stderr=subprocess.DEVNULL)
    os.close(3)
    try:
        report(args, proc, loadgen, port, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
        if not args.keep and os.path.exists(out):
            os.unlink(out)


def report(args, proc, loadgen, port, out):
    # Wait until it answers (the warm-up is a handful of connections).
    for _ in range(200):
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=1)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if c.recv(100):
                c.close()
                break
        except OSError:
            pass
        time.sleep(0.05)
    if args.tool == "callgrind":
        # Count the load only: zero the counters after start-up and warm-up.
        for pid in children(proc.pid) or [proc.pid]:
            subprocess.run(["callgrind_control", "--zero", str(pid)],
                           capture_output=True)
    if args.keepalive:
        lg = [loadgen, "--target", f"127.0.0.1:{port}", "--mode", "long",
              "--connections", "8", "--interval", "1", "--duration", "5"]
    else:
        lg = [loadgen, "--target", f"127.0.0.1:{port}", "--concurrency",
              str(args.concurrency), "--max-connections", str(args.conns),
              "--duration", "120"]
    res = subprocess.run(lg, capture_output=True, text=True)
    summary = res.stdout.strip()
    ok = int(re.search(r"ok=(\d+)", summary).group(1))
    failed = int(re.search(r"failed=(\d+)", summary).group(1))
    # Stop the worker (strace/valgrind's child) and let the tool report.
    for pid in children(proc.pid) or [proc.pid]:
        os.kill(pid, signal.SIGTERM)
    proc.wait(timeout=60)
    print(f"<!-- loadgen: {summary.splitlines()[0]} -->")
    if failed:
        print(f"FAILED requests: {failed}", file=sys.stderr)
    n = ok  # answered requests (one per connection unless --keepalive)
    if args.tool == "strace":
        print(f"| syscall | calls per {'request' if args.keepalive else 'connection'} | errors per connection |")
        print("| --- | ---: | ---: |")
        total = 0
        with open(out) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 5 or not fields[0][0].isdigit():
                    continue
                name = fields[-1]
                calls = int(fields[3])
                errors = int(fields[4]) if len(fields) == 6 else 0
                if name == "total":
                    total = calls
                    continue
                if calls / n < 0.01:
                    continue  # start-up and rare paths
                print(f"| {name} | {calls / n:.2f} | {errors / n:.2f} |")
        print(f"| **total** | **{total / n:.2f}** | |")
        print(f"\n{n} answered; every process of the worker, start-up "
              "included")
    else:
        with open(out) as f:
            text = f.read()
        total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
        print(f"instructions per {'request' if args.keepalive else 'connection'}: "
              f"{total / n:.0f} ({total} over {n}, counted from after start-up)")


if __name__ == "__main__":
    main()
