#!/usr/bin/env python3
"""The DaemonSet's pod under a real container engine (podman kube play).

Steps:
1. Build the runtime image from this build's binaries
   (deploy/container/build-image.sh --runtime-only; the Debian base is made
   with mmdebstrap once and reused).
2. Generate a Pod from the DaemonSet's pod template in deploy/kubernetes (never
   a copy) and play it: the manifest's exact securityContext (capabilities,
   read-only root, Localhost seccomp profile), hostNetwork, the ConfigMap.
3. Pod A serves: HTTP answers, /readyz is 200 on the probe port, the host's
   portfleetctl works through the hostPath socket, BPF steering counts
   connections, every worker has CapEff 0, NoNewPrivs 1 and runs as nobody.
4. Under continuous load (200 connections/s), pod B (a new pod UID) surges:
   it takes the sockets over; neither container restarts; A stays idle.
5. A's process is SIGKILLed; the engine restarts it (restartPolicy Always);
   it finds its pod UID retired and stays idle: B is never asked for the
   sockets and its workers are unchanged.
6. Pod A is deleted: it stops at once. The load saw 0 failed connections.

Adaptations for podman 4.3, each what a kubelet would do: the downward API
values (status.hostIP -> 127.0.0.1, metadata.uid -> a fresh UUID) and $(VAR)
expansion in the command are done here; the seccompProfile field becomes
podman's annotation; hostPaths point into a temporary directory (bpffs: a
private subdirectory of /sys/fs/bpf); the listener listens on 127.0.0.1 and a
free port instead of 0.0.0.0:8080. Everything else is the manifest's.

Run: PORTFLEET_BUILD_DIR=build tests/deploy/kube_play_surge_test.py
(ctest -L deploy with -DPORTFLEET_DEPLOY_TESTS=ON). Needs root and podman.
"""
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(os.environ.get("PORTFLEET_BUILD_DIR", os.path.join(REPO, "build")))
IMAGE = "localhost/portfleet:deploy-test"
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)
    return cond


def run(*args, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, **kw)


def wait_for(pred, timeout, step=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except Exception:
        return 0, ""


def podman(*args):
    return run("podman", *args)


def inspect(container, fmt):
    return podman("inspect", container, "--format", fmt).stdout.strip()


def main():
    if os.geteuid() != 0 or shutil.which("podman") is None:
        print("FAIL needs root and podman (deploy/container/build-image.sh installs it)")
        return 1
    work = tempfile.mkdtemp(prefix="portfleet-deploy-")
    os.environ["PORTFLEET_IMAGE_WORK"] = os.path.join(work, "image")
    os.environ.setdefault("PORTFLEET_REUSE_BASE", "1")
    t0 = time.time()
    b = run(os.path.join(REPO, "deploy/container/build-image.sh"), "--runtime-only",
            "--build-dir", BUILD, "--tag", IMAGE)
    print(b.stdout + b.stderr)
    if not check(b.returncode == 0, "runtime image built (%.0fs)" % (time.time() - t0)):
        return 1
    os.environ["CONTAINERS_CONF"] = os.path.join(work, "image", "containers.conf")

    docs = [d for d in yaml.safe_load_all(open(os.path.join(REPO, "deploy/kubernetes/daemonset.yaml"))) if d]
    ds = [d for d in docs if d["kind"] == "DaemonSet"][0]
    cm = yaml.safe_load(open(os.path.join(REPO, "deploy/kubernetes/configmap.yaml")))
    port = free_port()
    cm["data"]["fleet.textproto"] = cm["data"]["fleet.textproto"].replace(
        '"0.0.0.0:8080"', '"127.0.0.1:%d"' % port)
    check('"127.0.0.1:%d"' % port in cm["data"]["fleet.textproto"], "ConfigMap listener moved to a free loopback port")
    cm["metadata"].pop("namespace", None)
    cm_path = os.path.join(work, "configmap.yaml")
    yaml.safe_dump(cm, open(cm_path, "w"))

    host = {"/sys/fs/bpf": "/sys/fs/bpf", "/run/portfleet": os.path.join(work, "run"),
            "/var/lib/portfleet": os.path.join(work, "state")}
    bpffs = "/sys/fs/bpf/portfleet-deploy-test-%d" % os.getpid()
    seccomp_root = os.path.join(work, "seccomp")
    os.makedirs(seccomp_root)

    def pod_yaml(name):
        t = copy.deepcopy(ds["spec"]["template"])
        uid = str(uuid.uuid4())
        c = t["spec"]["containers"][0]
        c["image"] = IMAGE
        values = {}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if ref == "status.hostIP":
                e.pop("valueFrom"); e["value"] = "127.0.0.1"
            elif ref == "metadata.uid":
                e.pop("valueFrom"); e["value"] = uid
            values[e["name"]] = e["value"]
        c["command"] = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in c["command"]]
        c["command"] = [("--bpffs=" + bpffs) if a.startswith("--bpffs=") else a for a in c["command"]]
        for v in t["spec"]["volumes"]:
            if "hostPath" in v:
                v["hostPath"]["path"] = host[v["hostPath"]["path"]]
        ann = t["metadata"].setdefault("annotations", {})
        sp = c["securityContext"]["seccompProfile"]
        if sp["type"] == "Localhost":
            src = os.path.join(REPO, "deploy/kubernetes/seccomp", os.path.basename(sp["localhostProfile"]))
            shutil.copy(src, seccomp_root)
            ann["container.seccomp.security.alpha.kubernetes.io/" + c["name"]] = \
                "localhost/" + os.path.basename(sp["localhostProfile"])
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": t["metadata"]["labels"], "annotations": ann},
               "spec": t["spec"]}
        path = os.path.join(work, name + ".yaml")
        yaml.safe_dump(pod, open(path, "w"))
        return path, c

    pods = []
    load = None
    try:
        path_a, spec_c = pod_yaml("pf-deploy-a")
        caps = spec_c["securityContext"]["capabilities"]["add"]
        print("securityContext:", json.dumps(spec_c["securityContext"]))
        t0 = time.time()
        r = podman("kube", "play", "--configmap", cm_path, "--seccomp-profile-root", seccomp_root, path_a)
        pods.append("pf-deploy-a")
        check(r.returncode == 0, "pod A played" + ("" if r.returncode == 0 else ": " + r.stderr.strip()[-500:]))
        a = "pf-deploy-a-agent"
        url = "http://127.0.0.1:%d/" % port
        served = wait_for(lambda: http(url)[0] == 200, 30)
        check(served, "pod A answers HTTP (%.1fs after play)" % (time.time() - t0))
        if not served:
            print(podman("logs", a).stdout[-3000:], podman("logs", a).stderr[-3000:])
            return 1
        check(wait_for(lambda: http("http://127.0.0.1:9474/readyz")[0] == 200, 15),
              "/readyz 200 on the probe port (NODE_IP:9474)")
        logs = podman("logs", a).stderr + podman("logs", a).stdout
        check("BPF steering active" in logs, "BPF steering active with capabilities " + ",".join(caps))
        ctl = [os.path.join(BUILD, "ctl/portfleetctl"), "--server", "unix://" + host["/run/portfleet"] + "/api.sock"]
        shards = run(*ctl, "get", "shards", "web", "-o", "json")
        check(shards.returncode == 0, "host portfleetctl through the hostPath socket")
        for _ in range(20):
            http(url)
        agent_pid = int(inspect(a, "{{.State.Pid}}"))
        workers = run("pgrep", "-P", str(agent_pid)).stdout.split()
        check(len(workers) >= 1, "workers running (%d)" % len(workers))
        for w in workers:
            st = open("/proc/%s/status" % w).read()
            f = dict(l.split(":", 1) for l in st.splitlines() if ":" in l)
            check(f["CapEff"].strip() == "0000000000000000" and f["NoNewPrivs"].strip() == "1"
                  and f["Uid"].split()[0] == "65534",
                  "worker %s: CapEff %s NoNewPrivs %s Uid %s" % (w, f["CapEff"].strip(), f["NoNewPrivs"].strip(), f["Uid"].split()[0]))
        print(run(*ctl, "get", "shards", "web").stdout)

        load = subprocess.Popen([os.path.join(BUILD, "tests/portfleet-loadgen"), "--target", "127.0.0.1:%d" % port,
                                 "--rate", "200", "--duration", "25s"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        path_b, _ = pod_yaml("pf-deploy-b")
        t0 = time.time()
        r = podman("kube", "play", "--configmap", cm_path, "--seccomp-profile-root", seccomp_root, path_b)
        pods.append("pf-deploy-b")
        check(r.returncode == 0, "pod B played" + ("" if r.returncode == 0 else ": " + r.stderr.strip()[-500:]))
        b_ = "pf-deploy-b-agent"
        done = wait_for(lambda: "takeover complete" in podman("logs", b_).stderr, 30)
        check(done, "pod B took the sockets over (%.1fs after play)" % (time.time() - t0))
        check(wait_for(lambda: "idle (no API" in podman("logs", a).stderr, 20), "pod A drained and idles")
        b_workers = sorted(run("pgrep", "-P", inspect(b_, "{{.State.Pid}}")).stdout.split())
        check(inspect(a, "{{.RestartCount}}") == "0" and inspect(b_, "{{.RestartCount}}") == "0",
              "no container restarted during the surge")

        os.kill(int(inspect(a, "{{.State.Pid}}")), 9)
        check(wait_for(lambda: inspect(a, "{{.RestartCount}}") == "1" and
                       "retired; staying idle" in podman("logs", a).stderr, 20),
              "crashed pod A restarted by the engine and stays retired")
        time.sleep(3)
        check(inspect(a, "{{.RestartCount}}") == "1", "pod A restarted once, no flapping")
        check(inspect(b_, "{{.RestartCount}}") == "0", "pod B never restarted")
        check(podman("logs", b_).stderr.count("takeover requested") == 0, "B was never asked for the sockets")
        check(sorted(run("pgrep", "-P", inspect(b_, "{{.State.Pid}}")).stdout.split()) == b_workers,
              "B's workers unchanged")
        t0 = time.time()
        podman("pod", "stop", "-t", "30", "pf-deploy-a")
        code = inspect(a, "{{.State.ExitCode}}")
        check(code == "0", "deleted pod A stopped with exit 0 in %.1fs" % (time.time() - t0))
        out, _ = load.communicate(timeout=60)
        load = None
        print(out.strip())
        m = re.search(r"ok=(\d+) failed=(\d+)", out)
        check(m is not None and int(m.group(2)) == 0 and int(m.group(1)) > 1000,
              "load: %s" % (m.group(0) if m else out[-200:]))
        check(http(url)[0] == 200, "pod B serves after A is gone")
    finally:
        if load is not None:
            load.kill()
        for p in pods:
            podman("pod", "rm", "-f", "-t", "5", p)
        shutil.rmtree(bpffs, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print("%d failure(s)" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
