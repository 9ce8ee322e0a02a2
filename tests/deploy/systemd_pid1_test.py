#!/usr/bin/env python3
"""The unit from deploy/systemd under systemd as PID 1 in a container.

Steps:
1. Image: a Debian base with systemd, procps and the runtime libraries (mmdebstrap,
   the library list read from deploy/container/build-image.sh; reused when
   PORTFLEET_REUSE_BASE is set and it exists), plus what
   deploy/systemd/install.sh stages with DESTDIR (the binaries of this
   build, the unit unchanged, the spec: listener web, 2 shards, workers as
   `nobody` as the shipped configs have them) and
   /etc/default/portfleet-agent with PORTFLEET_AGENT_OPTS=--config-mode=declarative.
2. `podman run --systemd=always` (runc, cgroupfs, host network, privileged so
   that systemd can build the unit's sandbox) with /sbin/init.
3. `systemctl start` returns only after READY=1 (sent once every listener's
   sockets are bound, its workers started and the API is up): at its return
   HTTP answers at once and the API answers, and the unit is active with
   the agent's STATUS= (sent with READY=1). The workers run as uid 65534
   with no capabilities; the agent has no CAP_SYS_PTRACE (the unit's set).
4. Under continuous load from the host (200 connections/s): the spec is
   replaced (3 shards) and `systemctl reload` (SIGHUP) applies it: 3 shards
   ready, the journal shows the reload.
5. The watchdog: the agent is SIGSTOPped; systemd's watchdog (WatchdogSec=10s)
   aborts it and restarts it (NRestarts 1, a new main pid); the workers keep
   serving meanwhile and the new agent re-adopts them (same pids): workers
   of another user, trusted from the agent's record of its workers
   (/var/lib/portfleet/workers) without reading their /proc/PID/fd.
6. `systemctl restart`: the agent asks systemd (sd-bus) what its SIGTERM
   is, finds its unit's restart job, steps aside (exit 0, workers left
   serving) and the new agent re-adopts them: same worker pids, a new main
   pid, NRestarts unchanged, the journal says how many workers were left.
7. A restart whose new agent cannot start (the binary replaced by one that
   exits 1): the restart fails, the workers keep serving without an agent;
   with the binary back, the next agent re-adopts them.
8. The load saw 0 failed connections.
9. `systemctl stop` still drains and succeeds: Result=success, exit status 0,
   no worker left.

Run: PORTFLEET_BUILD_DIR=build tests/deploy/systemd_pid1_test.py
(ctest -L deploy with -DPORTFLEET_DEPLOY_TESTS=ON). Needs root and podman.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kube_play_surge_test import (BUILD, REPO, check, failures, free_port, http,  # noqa: E402
                                  podman, run, wait_for)

IMAGE = "localhost/portfleet-systemd:deploy-test"
NAME = "pf-deploy-systemd"
UNIT = "portfleet-agent.service"


def spec(port, shards):
    return """listeners {
  name: "web"
  address: "127.0.0.1:%d"
  shards: %d
  worker { command: "portfleet-worker" args: "--mode=http" user: "nobody" }
  drain_timeout_seconds: 5
}
""" % (port, shards)


def sh(*args):
    return podman("exec", NAME, *args)


def prop(name):
    return sh("systemctl", "show", "-p", name, "--value", UNIT).stdout.strip()


def ctl_json(*args):
    r = sh("portfleetctl", *args, "-o", "json")
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {}


def shard_pids():
    return {s.get("index", 0): s.get("pid") for s in ctl_json("get", "shards", "web").get("shards", [])
            if s.get("ready") and s.get("state") == "running"}


def journal():
    return sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout


def main():
    if os.geteuid() != 0 or shutil.which("podman") is None:
        print("FAIL needs root and podman (deploy/container/build-image.sh installs it)")
        return 1
    work = tempfile.mkdtemp(prefix="portfleet-deploy-systemd-")
    # The tier's containers.conf (runc, cgroupfs, ulimits) and packages.
    os.environ["PORTFLEET_IMAGE_WORK"] = os.path.join(work, "image")
    os.environ.setdefault("PORTFLEET_REUSE_BASE", "1")
    t0 = time.time()
    b = run(os.path.join(REPO, "deploy/container/build-image.sh"), "--runtime-only",
            "--build-dir", BUILD, "--tag", "localhost/portfleet:deploy-test")
    if not check(b.returncode == 0, "tier set-up (build-image.sh --runtime-only, %.0fs)" % (time.time() - t0)):
        print(b.stdout + b.stderr)
        return 1
    os.environ["CONTAINERS_CONF"] = os.path.join(work, "image", "containers.conf")

    t0 = time.time()
    script = open(os.path.join(REPO, "deploy/container/build-image.sh")).read()
    libs = re.search(r'runtime_pkgs="([^"]+)"', script).group(1).split()
    # systemd, and procps for the unit's ExecReload=/bin/kill.
    include = ["systemd", "systemd-sysv", "dbus", "procps"] + libs
    # Tagged by its package list, so a changed list makes a new base.
    base = "localhost/portfleet-systemd-base:bookworm-" + \
        hashlib.sha256(" ".join(include).encode()).hexdigest()[:12]
    if not (os.environ.get("PORTFLEET_REUSE_BASE") and podman("image", "exists", base).returncode == 0):
        sources = [f for f in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
                   if os.path.isfile(f) and os.path.getsize(f) > 0][0]
        tar = os.path.join(work, "base.tar")
        r = run("mmdebstrap", "--quiet", "--variant=minbase",
                "--include=" + ",".join(include), "bookworm", tar, sources)
        if not check(r.returncode == 0, "systemd base image made with mmdebstrap"):
            print(r.stderr[-2000:])
            return 1
        podman("import", "--quiet", tar, base)
        os.remove(tar)
    check(podman("image", "exists", base).returncode == 0, "systemd base image (%.0fs)" % (time.time() - t0))

    port = free_port()
    ctx = os.path.join(work, "ctx")
    stage = os.path.join(ctx, "root")
    spec_file = os.path.join(work, "fleet.textproto")
    open(spec_file, "w").write(spec(port, 2))
    r = run(os.path.join(REPO, "deploy/systemd/install.sh"), "--spec", spec_file,
            env=dict(os.environ, DESTDIR=stage, PORTFLEET_BUILD_DIR=BUILD))
    if not check(r.returncode == 0, "install.sh staged with DESTDIR"):
        print(r.stdout + r.stderr)
        return 1
    os.makedirs(os.path.join(stage, "etc/default"), exist_ok=True)
    # The host's bpffs is bound into the container (a host's systemd mounts
    # one at boot; systemd in a container does not), the pins in a private
    # directory of it, removed at the end.
    bpffs = "/sys/fs/bpf/portfleet-deploy-systemd-%d" % os.getpid()
    open(os.path.join(stage, "etc/default/portfleet-agent"), "w").write(
        "PORTFLEET_AGENT_OPTS=--config-mode=declarative --bpffs=%s\n" % bpffs)
    check(open(os.path.join(stage, "etc/systemd/system", UNIT)).read() ==
          open(os.path.join(REPO, "deploy/systemd", UNIT)).read(), "the unit is deploy/systemd's, unchanged")
    open(os.path.join(ctx, "Containerfile"), "w").write("FROM %s\nCOPY root/ /\n" % base)
    r = podman("build", "--quiet", "-t", IMAGE, ctx)
    if not check(r.returncode == 0, "image with the staged install"):
        print(r.stderr[-2000:])
        return 1

    load = None
    started = False
    try:
        r = podman("run", "-d", "--name", NAME, "--systemd=always", "--network=host", "--privileged",
                   "-v", "/sys/fs/bpf:/sys/fs/bpf", IMAGE, "/sbin/init")
        started = r.returncode == 0
        if not check(started, "systemd container started" + ("" if started else ": " + r.stderr[-500:])):
            return 1
        check(wait_for(lambda: sh("systemctl", "is-system-running").stdout.strip() in ("running", "degraded"), 30),
              "systemd is PID 1 and running")

        # 3. start returns after READY=1: the sockets are bound, the workers
        # started and the API up (connections wait in the accept queues
        # until the workers are ready: none is refused).
        t0 = time.time()
        r = sh("systemctl", "start", UNIT)
        took = time.time() - t0
        code, _ = http("http://127.0.0.1:%d/" % port)
        status = ctl_json("status")
        check(r.returncode == 0 and code == 200 and status.get("version"),
              "systemctl start returned after %.2fs; at once HTTP %d and the API answers" % (took, code))
        # STATUS= travels with READY=1 (the journal's order of the agent's
        # lines and systemd's "Started" is not the order they happened in).
        check(prop("ActiveState") == "active" and prop("SubState") == "running" and prop("StatusText"),
              "unit active/running with the agent's STATUS= (%s)" % prop("StatusText")[:60])
        check(status.get("config", {}).get("mode") == "declarative",
              "/etc/default/portfleet-agent: declarative mode")
        # The unit's capabilities (CAP_BPF, no CAP_PERFMON or CAP_SYS_ADMIN)
        # load the steering program: without it the agent would serve with
        # the kernel's hash and only warn.
        check("BPF steering active" in journal(),
              "journal: BPF steering active under the unit's capabilities")
        creds = {}
        for pid in shard_pids().values():
            st = sh("cat", "/proc/%d/status" % pid).stdout
            creds[pid] = tuple(re.search(r"^%s:\s*(\S+)" % k, st, re.M).group(1)
                               for k in ("Uid", "CapEff", "NoNewPrivs"))
        agent_st = sh("cat", "/proc/%s/status" % prop("MainPID")).stdout
        agent_eff = int(re.search(r"^CapEff:\s*(\S+)", agent_st, re.M).group(1), 16)
        check(len(creds) == 2 and all(c == ("65534", "0000000000000000", "1") for c in creds.values())
              and not agent_eff & (1 << 19),
              "workers as nobody, CapEff 0, NoNewPrivs 1 (%s); the agent without CAP_SYS_PTRACE (CapEff %x)"
              % (sorted(set(creds.values())), agent_eff))

        load = subprocess.Popen([os.path.join(BUILD, "tests/portfleet-loadgen"), "--target", "127.0.0.1:%d" % port,
                                 "--rate", "200", "--duration", "50s"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)

        # 4. reload applies the spec.
        r = run("podman", "exec", "-i", NAME, "sh", "-c",
                   "cat > /etc/portfleet/fleet.textproto.new && mv /etc/portfleet/fleet.textproto.new "
                   "/etc/portfleet/fleet.textproto", input=spec(port, 3))
        check(r.returncode == 0, "spec replaced (3 shards)")
        r = sh("systemctl", "reload", UNIT)
        check(r.returncode == 0, "systemctl reload" + ("" if r.returncode == 0 else ": " + r.stderr.strip()))
        check(wait_for(lambda: len(shard_pids()) == 3, 20), "reload applied the spec: 3 shards ready")
        check("reloading /etc/portfleet/fleet.textproto" in journal(), "journal: the agent reloaded on SIGHUP")

        # 5. the watchdog restarts a wedged agent; workers keep serving.
        before = shard_pids()
        main_pid = prop("MainPID")
        t0 = time.time()
        sh("kill", "-STOP", main_pid)
        restarted = wait_for(lambda: prop("MainPID") not in ("0", main_pid) and prop("NRestarts") == "1"
                             and prop("ActiveState") == "active", 40, step=0.5)
        check(restarted, "watchdog: SIGSTOPped agent restarted by systemd in %.1fs (NRestarts %s)"
              % (time.time() - t0, prop("NRestarts")))
        check("Watchdog timeout" in sh("journalctl", "--no-pager", "-o", "cat").stdout, "journal: watchdog timeout")
        check(wait_for(lambda: shard_pids() == before, 20),
              "workers re-adopted by the new agent (same pids %s)" % sorted(before.values()))

        # 6. restart: the agent steps aside, the next one re-adopts.
        before = shard_pids()
        main_pid = prop("MainPID")
        failed_runs = journal().count("Failed with result")
        t0 = time.time()
        r = sh("systemctl", "restart", UNIT)
        took = time.time() - t0
        check(r.returncode == 0 and prop("ActiveState") == "active",
              "systemctl restart returned in %.2fs%s" % (took, "" if r.returncode == 0 else ": " + r.stderr.strip()))
        # systemd resets NRestarts on a manual (re)start; a failure would
        # have been counted by the automatic restart and logged.
        check(prop("MainPID") not in ("0", main_pid) and prop("NRestarts") == "0" and
              journal().count("Failed with result") == failed_runs,
              "restart: new main pid %s (was %s), NRestarts %s, no failed run"
              % (prop("MainPID"), main_pid, prop("NRestarts")))
        check(wait_for(lambda: shard_pids() == before, 20),
              "restart: workers re-adopted by the new agent (same pids %s, now %s)"
              % (sorted(before.values()), sorted(shard_pids().values())))
        j = journal()
        timed = sh("journalctl", "-u", UNIT, "--no-pager", "-o", "short-precise").stdout.splitlines()
        start = max(i for i, line in enumerate(timed) if "systemd is restarting" in line) if \
            any("systemd is restarting" in line for line in timed) else len(timed)
        for line in timed[start:]:
            if re.search(r"systemd is restarting|stepped aside|Stopped|Starting|worker\(s\) reconnected|"
                         r"fleet serving|Started", line):
                print("   " + line)
        check("systemd is restarting %s (job restart): leaving 3 workers of 1 listener to the next agent" % UNIT in j,
              "journal: the old agent stepped aside for the restart")
        check(j.count("re-adopted worker pid") >= 6, "journal: the new agent re-adopted the workers")

        # 7. the restarted agent fails: the workers serve on, and are
        # re-adopted by the next agent that starts.
        agent_bin = "/usr/local/bin/portfleet-agent"
        sh("mv", agent_bin, agent_bin + ".good")
        sh("sh", "-c", "printf '#!/bin/sh\\nexit 1\\n' > %s && chmod 755 %s" % (agent_bin, agent_bin))
        r = sh("systemctl", "restart", UNIT)
        alive = all(sh("kill", "-0", str(p)).returncode == 0 for p in before.values())
        code, _ = http("http://127.0.0.1:%d/" % port)
        check(r.returncode != 0 and alive and code == 200,
              "restart into a broken agent fails (%s); the workers serve on without one (HTTP %d)"
              % (prop("Result"), code))
        time.sleep(1)
        sh("mv", "-f", agent_bin + ".good", agent_bin)
        sh("systemctl", "reset-failed", UNIT)
        r = sh("systemctl", "start", UNIT)
        check(r.returncode == 0 and wait_for(lambda: shard_pids() == before, 20),
              "with the binary back, the next agent re-adopts them (same pids %s)" % sorted(before.values()))

        # 8. no failed connection.
        out, _ = load.communicate(timeout=90)
        load = None
        print(out.strip())
        m = re.search(r"ok=(\d+) failed=(\d+)", out)
        check(m is not None and int(m.group(2)) == 0 and int(m.group(1)) > 4000,
              "load: %s" % (m.group(0) if m else out[-200:]))

        # 9. stop still drains and succeeds.
        t0 = time.time()
        r = sh("systemctl", "stop", UNIT)
        check(r.returncode == 0 and prop("Result") == "success" and prop("ExecMainStatus") == "0",
              "systemctl stop in %.1fs: Result=%s, exit status %s"
              % (time.time() - t0, prop("Result"), prop("ExecMainStatus")))
        check(sh("pgrep", "-f", "portfleet-worker").stdout.strip() == "", "no worker left after stop")
        check("drained" in journal(), "journal: workers drained")
    finally:
        if load is not None:
            load.kill()
        if started:
            if failures:
                print(journal()[-4000:])
            podman("rm", "-f", "-t", "5", NAME)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(bpffs, ignore_errors=True)
    print("%d failure(s)" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
