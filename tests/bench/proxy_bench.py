#!/usr/bin/env python3
"""portfleet-worker --mode proxy under the agent vs HAProxy (mode tcp).

Paired and interleaved (A B A B ...) (the team's benchmarking rules), in a
private network namespace this script creates, loopback only:

  * new connections/s: portfleet-loadgen, one HTTP request per connection,
    32 in flight, 2 client threads, through the proxy to portfleet-worker
    --mode http (2 shards);
  * bulk throughput: portfleet-proxy-bulk, 8 long connections streaming
    through the proxy to portfleet-worker --mode echo (2 shards), every
    echoed byte checked.

Pairing: the proxy listener has 2 shards (one worker process each, steering
LEAST_CONNECTIONS by default, HASH with --steering hash) and HAProxy runs
`nbthread 2` (one process, one listening socket shared by its threads, the Debian 12 package's 2.6 default); the backends
are the same worker processes for both. Machine CPU per connection comes
from /proc/stat deltas over each run.

Needs root. Installs haproxy with apt-get if it is missing (without letting
the package start a system haproxy). Not run by ctest or CI.

  tests/bench/proxy_bench.py [--build BUILD_DIR] [--pairs 5] [--seconds 10]
                             [--only conn|bulk] [--steering least-connections|hash]

Prints Markdown to stdout.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

PORTS = {
    "backend-http": 19080,
    "backend-echo": 19081,
    "pf-http": 19000,
    "pf-echo": 19001,
    "ha-http": 19100,
    "ha-echo": 19101,
}

SPEC = """
listeners {{
  name: "backend-http" address: "127.0.0.1:{backend-http}" shards: 2
  worker {{ command: "portfleet-worker" args: "--mode=http" }}
}}
listeners {{
  name: "backend-echo" address: "127.0.0.1:{backend-echo}" shards: 2
  worker {{ command: "portfleet-worker" args: "--mode=echo" }}
}}
listeners {{
  name: "pf-http" address: "127.0.0.1:{pf-http}" shards: 2
  worker {{ command: "portfleet-worker" args: "--mode=proxy"
           args: "--upstream=127.0.0.1:{backend-http}" }}
  steering {{ policy: {policy} }}
}}
listeners {{
  name: "pf-echo" address: "127.0.0.1:{pf-echo}" shards: 2
  worker {{ command: "portfleet-worker" args: "--mode=proxy"
           args: "--upstream=127.0.0.1:{backend-echo}" }}
  steering {{ policy: {policy} }}
}}
"""

HAPROXY_CFG = """
global
    nbthread 2
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend ha-http
    bind 127.0.0.1:{ha-http}
    default_backend b-http
backend b-http
    server s1 127.0.0.1:{backend-http}
frontend ha-echo
    bind 127.0.0.1:{ha-echo}
    default_backend b-echo
backend b-echo
    server s1 127.0.0.1:{backend-echo}
"""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ensure_haproxy():
    path = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    if path:
        return path
    log("haproxy is missing: apt-get install -y haproxy")
    own_policy = not os.path.exists("/usr/sbin/policy-rc.d")
    if own_policy:  # keep the package from starting a system haproxy
        with open("/usr/sbin/policy-rc.d", "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod("/usr/sbin/policy-rc.d", 0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env,
                       stdout=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq",
                        "--no-install-recommends", "haproxy"], check=True,
                       env=env, stdout=sys.stderr)
    finally:
        if own_policy:
            os.remove("/usr/sbin/policy-rc.d")
    return "/usr/sbin/haproxy"


def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle


def busy_fraction(seconds=0.5):
    t0, i0 = cpu_times()
    time.sleep(seconds)
    t1, i1 = cpu_times()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(limit=0.25, max_wait=15.0):
    """Waits (bounded) until the machine is mostly idle; returns busy."""
    end = time.time() + max_wait
    busy = busy_fraction()
    while busy > limit and time.time() < end:
        busy = busy_fraction()
    return busy


def wait_port(port, timeout=20.0):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def run_measured(cmd):
    t0, i0 = cpu_times()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    t1, i1 = cpu_times()
    ticks = os.sysconf("SC_CLK_TCK")
    busy_s = ((t1 - t0) - (i1 - i0)) / ticks
    return out, busy_s, (t1 - t0) / ticks / os.cpu_count()


def conn_run(build, port, seconds):
    with tempfile.NamedTemporaryFile(suffix=".json") as j:
        out, busy, wall = run_measured([
            f"{build}/tests/portfleet-loadgen", "--target",
            f"127.0.0.1:{port}", "--concurrency", "32", "--threads", "2",
            "--duration", str(seconds), "--max-connections", "5000000",
            "--max-in-flight", "64", "--json", j.name, "--quiet"])
        r = json.load(open(j.name))
    rate = r["ok"] / r["elapsed_seconds"]
    return {"rate": rate, "failures": r["failures"],
            "p50": r["latency_ms"]["p50"],
            "p99": r["latency_ms"]["p99"],
            "cpu_us": busy * 1e6 / max(1, r["ok"]),
            "busy": busy / max(1e-9, wall * os.cpu_count())}


def shard_split(build, api, listener):
    """Open connections per shard of `listener` ("5/3"), from the agent."""
    out = subprocess.run(
        [f"{build}/ctl/portfleetctl", "--server", f"unix://{api}", "get",
         "shards", listener, "-o", "json"],
        capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return "?"
    doc = json.loads(out.stdout)
    shards = doc.get("shards", doc) if isinstance(doc, dict) else doc
    counts = [int(s.get("load", {}).get("connections", 0)) for s in shards]
    return "/".join(str(c) for c in counts)


def bulk_run(build, port, seconds, split_of=None):
    """`split_of`: (api socket, listener) to read the connections per shard
    of a portfleet listener halfway through the run."""
    t0, i0 = cpu_times()
    proc = subprocess.Popen([
        f"{build}/tests/portfleet-proxy-bulk", "--target",
        f"127.0.0.1:{port}", "--connections", "8", "--threads", "2",
        "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)
    split = "-"
    if split_of:
        time.sleep(seconds / 2)
        split = shard_split(build, *split_of)
    stdout, _ = proc.communicate(timeout=600)
    t1, i1 = cpu_times()
    ticks = os.sysconf("SC_CLK_TCK")
    busy = ((t1 - t0) - (i1 - i0)) / ticks
    wall = (t1 - t0) / ticks / os.cpu_count()
    r = json.loads(stdout)
    return {"rate": r["mib_per_s"], "failures": r["errors"],
            "first_error": r["first_error"], "split": split,
            "cpu_us": busy * 1e6 / max(1.0, r["echoed_bytes"] / (1 << 20)),
            "busy": busy / max(1e-9, wall * os.cpu_count())}


def ratios(pairs, key, invert=False):
    rs = [(b[key] / a[key] if invert else a[key] / b[key])
          for a, b in pairs if a[key] > 0 and b[key] > 0]
    if not rs:
        return "n/a"
    return (f"{statistics.median(rs):.2f}× (range {min(rs):.2f}–"
            f"{max(rs):.2f})")


def table(title, unit, pairs):
    lines = [f"#### {title}", "",
             f"| pair | portfleet {unit} | HAProxy {unit} | ratio | "
             "portfleet CPU | HAProxy CPU | machine busy (pf / ha) | "
             "failures (pf / ha) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, (a, b) in enumerate(pairs, 1):
        lines.append(
            f"| {i} | {a['rate']:.0f} | {b['rate']:.0f} | "
            f"{a['rate'] / b['rate']:.2f} | {a['cpu_us']:.1f} | "
            f"{b['cpu_us']:.1f} | {a['busy']:.0%} / {b['busy']:.0%} | "
            f"{a['failures']} / {b['failures']} |")
    lines.append("")
    lines.append(f"Rate ratio portfleet/HAProxy: **{ratios(pairs, 'rate')}**; "
                 f"CPU per unit HAProxy/portfleet (above 1: portfleet "
                 f"cheaper): {ratios(pairs, 'cpu_us', invert=True)}.")
    if "split" in pairs[0][0]:
        lines.append(
            "Connections per proxy shard, portfleet (read halfway): " +
            ", ".join(a["split"] for a, _ in pairs) + ".")
    for q in ("p50", "p99"):
        if q in pairs[0][0]:
            lines.append(
                f"{q} latency ms (pf / ha): " + ", ".join(
                    f"{a[q]:.2f} / {b[q]:.2f}" for a, b in pairs) +
                f"; ratio HAProxy/portfleet {ratios(pairs, q, invert=True)}.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--only", choices=["conn", "bulk"],
                    help="run one of the two measurements")
    ap.add_argument("--steering", choices=["least-connections", "hash"],
                    default="least-connections",
                    help="steering policy of the portfleet proxy listeners")
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("proxy_bench.py: needs root (network namespace, BPF, apt-get)")
        return 2
    if not 1 <= args.pairs <= 20 or not 1 <= args.seconds <= 60:
        log("proxy_bench.py: --pairs 1-20, --seconds 1-60")
        return 2
    build = os.path.abspath(args.build)
    for b in ("worker/portfleet-worker", "agent/portfleet-agent",
              "ctl/portfleetctl", "tests/portfleet-loadgen",
              "tests/portfleet-proxy-bulk"):
        if not os.access(os.path.join(build, b), os.X_OK):
            log(f"proxy_bench.py: {build}/{b} is missing; build it: cmake "
                f"--build {build} --target portfleet-worker portfleet-agent "
                "portfleetctl portfleet-loadgen portfleet-proxy-bulk")
            return 2
    if not args.in_netns:
        haproxy = ensure_haproxy()
        return subprocess.call(
            ["unshare", "-n", sys.executable, os.path.abspath(__file__),
             "--in-netns", "--build", build, "--pairs", str(args.pairs),
             "--seconds", str(args.seconds), "--steering", args.steering] +
            (["--only", args.only] if args.only else []),
            env=dict(os.environ, PORTFLEET_HAPROXY=haproxy))
    haproxy = os.environ.get("PORTFLEET_HAPROXY", "/usr/sbin/haproxy")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("1024 65000\n")

    tmp = tempfile.mkdtemp(prefix="portfleet-proxy-bench-")
    bpffs = f"/sys/fs/bpf/portfleet-proxy-bench-{os.getpid()}"
    procs = []
    try:
        spec = os.path.join(tmp, "fleet.textproto")
        with open(spec, "w") as f:
            f.write(SPEC.format(**PORTS, policy={
                "hash": "STEERING_POLICY_HASH",
                "least-connections": "STEERING_POLICY_LEAST_CONNECTIONS",
            }[args.steering]))
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(**PORTS))
        agent_log = open(os.path.join(tmp, "agent.log"), "w")
        procs.append(subprocess.Popen(
            [f"{build}/agent/portfleet-agent", "--config", spec, "--api",
             f"unix://{tmp}/api.sock", "--state-dir", f"{tmp}/state",
             "--bpffs", bpffs, "--metrics", "127.0.0.1:0",
             "--log-level", "warning"],
            stdout=agent_log, stderr=agent_log))
        ha_log = open(os.path.join(tmp, "haproxy.log"), "w")
        procs.append(subprocess.Popen([haproxy, "-f", cfg, "-db"],
                                      stdout=ha_log, stderr=ha_log))
        for name, port in PORTS.items():
            if not wait_port(port):
                log(f"proxy_bench.py: {name} (port {port}) does not serve; "
                    f"logs in {tmp}")
                tmp = None
                return 1
        version = subprocess.run([haproxy, "-v"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        log("warm-up")
        conn_run(build, PORTS["pf-http"], 2)
        conn_run(build, PORTS["ha-http"], 2)
        bulk_run(build, PORTS["pf-echo"], 2)
        bulk_run(build, PORTS["ha-echo"], 2)
        api = os.path.join(tmp, "api.sock")
        conn_pairs, bulk_pairs = [], []
        for i in range(args.pairs):
            for kind, runner, pf, ha, out in (
                    ("conn", conn_run, "pf-http", "ha-http", conn_pairs),
                    ("bulk", bulk_run, "pf-echo", "ha-echo", bulk_pairs)):
                if args.only and kind != args.only:
                    continue
                wait_idle()
                a = (runner(build, PORTS[pf], args.seconds,
                            split_of=(api, "pf-echo")) if kind == "bulk"
                     else runner(build, PORTS[pf], args.seconds))
                wait_idle()
                b = runner(build, PORTS[ha], args.seconds)
                log(f"pair {i + 1} {kind}: portfleet {a['rate']:.0f}, "
                    f"haproxy {b['rate']:.0f}")
                out.append((a, b))
        print(f"### Proxy mode vs HAProxy, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n")
        print(f"{args.pairs} pairs × {args.seconds} s, A (portfleet) then B "
              f"(HAProxy) in each pair; {version}; {os.cpu_count()} CPUs; "
              f"portfleet proxy steering {args.steering}; "
              "both proxies to the same backend workers (2 shards each).\n")
        if conn_pairs:
            print(table("New connections/s (HTTP, one request per "
                        "connection, 32 in flight, 2 client threads; CPU in "
                        "µs of machine time per connection)", "conn/s",
                        conn_pairs))
        if bulk_pairs:
            print(table("Bulk throughput (8 connections echoed through the "
                        "proxy, MiB/s echoed; CPU in µs of machine time per "
                        "MiB)", "MiB/s", bulk_pairs))
        failed = sum(a["failures"] + b["failures"]
                     for a, b in conn_pairs + bulk_pairs)
        return 1 if failed else 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(bpffs, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
