#!/usr/bin/env python3
"""Declarative mode in the DaemonSet's pod: a ConfigMap change is reconciled.

Steps:
1. Build the runtime image from this build's binaries (as the surge test:
   deploy/container/build-image.sh --runtime-only; podman reuses its layers
   when the binaries did not change).
2. Generate a Pod from the DaemonSet's pod template in deploy/kubernetes plus
   the patch of components/declarative (both read from the repo, never a
   copy) and play it with the ConfigMap (`podman kube play --configmap`):
   listener web, 2 shards.
3. Under continuous load (200 connections/s for 20 s), change the ConfigMap the way
   the kubelet does. podman 4.3 materialises a ConfigMap volume as plain
   files and cannot update it live (`kube play --replace` recreates the
   pod), so the test lays the mounted volume out as the kubelet's
   atomic_writer does (fleet.textproto -> ..data/fleet.textproto, ..data ->
   a versioned directory) and swaps ..data by renaming a new symlink over it:
   web 3 shards. The agent reports generation 2 applied and 3 shards serve.
4. A broken ConfigMap is rejected (config error in `portfleetctl status`,
   event config-rejected) and the pod keeps serving; `portfleetctl scale` is
   refused naming the file and the mode.
5. The load saw 0 failed connections; the pod stops with exit 0.

Adaptations for podman 4.3 are those of kube_play_surge_test.py (downward API
values and $(VAR) expansion done here, seccomp annotation, hostPaths in a
temporary directory, a private bpffs subdirectory, 127.0.0.1 and a free port).

Run: PORTFLEET_BUILD_DIR=build tests/deploy/kube_play_configmap_test.py
(ctest -L deploy with -DPORTFLEET_DEPLOY_TESTS=ON). Needs root and podman.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kube_play_surge_test import (BUILD, IMAGE, REPO, check, failures, free_port,  # noqa: E402
                                  http, inspect, podman, run, wait_for)

POD = "pf-deploy-cm"


def component_args():
    """The container args the declarative component adds (its JSON patch)."""
    comp = yaml.safe_load(open(os.path.join(
        REPO, "deploy/kubernetes/components/declarative/kustomization.yaml")))
    args = []
    for p in comp["patches"]:
        for op in yaml.safe_load(p["patch"]):
            if op["op"] == "add" and op["path"] == "/spec/template/spec/containers/0/command/-":
                args.append(op["value"])
    return args


def kubelet_layout(volume, text, version):
    """Writes `text` as the kubelet does: a new versioned directory, a ..data
    symlink renamed over the old one, the file a symlink through ..data."""
    d = os.path.join(volume, "..%s" % version)
    os.makedirs(d)
    with open(os.path.join(d, "fleet.textproto"), "w") as f:
        f.write(text)
    tmp = os.path.join(volume, "..data_tmp")
    os.symlink("..%s" % version, tmp)
    os.rename(tmp, os.path.join(volume, "..data"))
    link = os.path.join(volume, "fleet.textproto")
    if not os.path.islink(link):
        os.symlink("..data/fleet.textproto", link + ".tmp")
        os.rename(link + ".tmp", link)


def main():
    if os.geteuid() != 0 or shutil.which("podman") is None:
        print("FAIL needs root and podman (deploy/container/build-image.sh installs it)")
        return 1
    work = tempfile.mkdtemp(prefix="portfleet-deploy-cm-")
    os.environ["PORTFLEET_IMAGE_WORK"] = os.path.join(work, "image")
    os.environ.setdefault("PORTFLEET_REUSE_BASE", "1")
    t0 = time.time()
    b = run(os.path.join(REPO, "deploy/container/build-image.sh"), "--runtime-only",
            "--build-dir", BUILD, "--tag", IMAGE)
    if not check(b.returncode == 0, "runtime image built (%.0fs)" % (time.time() - t0)):
        print(b.stdout + b.stderr)
        return 1
    os.environ["CONTAINERS_CONF"] = os.path.join(work, "image", "containers.conf")

    docs = [d for d in yaml.safe_load_all(open(os.path.join(REPO, "deploy/kubernetes/daemonset.yaml"))) if d]
    ds = [d for d in docs if d["kind"] == "DaemonSet"][0]
    cm = yaml.safe_load(open(os.path.join(REPO, "deploy/kubernetes/configmap.yaml")))
    port = free_port()
    spec = cm["data"]["fleet.textproto"].replace('"0.0.0.0:8080"', '"127.0.0.1:%d"' % port)
    spec = re.sub(r"shards: \d+.*", "shards: 2", spec, count=1)
    check('"127.0.0.1:%d"' % port in spec and "shards: 2" in spec,
          "ConfigMap listener on a free loopback port, 2 shards")
    cm["data"]["fleet.textproto"] = spec
    cm["metadata"].pop("namespace", None)
    # podman keeps a ConfigMap volume as a named volume after the pod: one of
    # our own, removed at the end, so that the surge test's stays untouched.
    cm_name = cm["metadata"]["name"]
    cm["metadata"]["name"] = cm_name + "-declarative-test"
    cm_path = os.path.join(work, "configmap.yaml")
    yaml.safe_dump(cm, open(cm_path, "w"))

    host = {"/sys/fs/bpf": "/sys/fs/bpf", "/run/portfleet": os.path.join(work, "run"),
            "/var/lib/portfleet": os.path.join(work, "state")}
    bpffs = "/sys/fs/bpf/portfleet-deploy-cm-%d" % os.getpid()
    seccomp_root = os.path.join(work, "seccomp")
    os.makedirs(seccomp_root)

    t = copy.deepcopy(ds["spec"]["template"])
    c = t["spec"]["containers"][0]
    c["image"] = IMAGE
    values = {}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if ref == "status.hostIP":
            e.pop("valueFrom"); e["value"] = "127.0.0.1"
        elif ref == "metadata.uid":
            e.pop("valueFrom"); e["value"] = str(uuid.uuid4())
        values[e["name"]] = e["value"]
    extra = component_args()
    check(extra == ["--config-mode=declarative"], "component adds %s" % extra)
    c["command"] = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in c["command"] + extra]
    c["command"] = [("--bpffs=" + bpffs) if a.startswith("--bpffs=") else a for a in c["command"]]
    for v in t["spec"]["volumes"]:
        if "hostPath" in v:
            v["hostPath"]["path"] = host[v["hostPath"]["path"]]
        if v.get("configMap", {}).get("name") == cm_name:
            v["configMap"]["name"] = cm["metadata"]["name"]
    ann = t["metadata"].setdefault("annotations", {})
    sp = c["securityContext"]["seccompProfile"]
    if sp["type"] == "Localhost":
        shutil.copy(os.path.join(REPO, "deploy/kubernetes/seccomp", os.path.basename(sp["localhostProfile"])),
                    seccomp_root)
        ann["container.seccomp.security.alpha.kubernetes.io/" + c["name"]] = \
            "localhost/" + os.path.basename(sp["localhostProfile"])
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": POD, "labels": t["metadata"]["labels"], "annotations": ann},
           "spec": t["spec"]}
    pod_path = os.path.join(work, POD + ".yaml")
    yaml.safe_dump(pod, open(pod_path, "w"))

    ctl = [os.path.join(BUILD, "ctl/portfleetctl"), "--server", "unix://" + host["/run/portfleet"] + "/api.sock"]

    def status():
        r = run(*ctl, "status", "-o", "json")
        try:
            return json.loads(r.stdout).get("config", {})
        except ValueError:
            return {}

    def ready_shards():
        r = run(*ctl, "get", "shards", "web", "-o", "json")
        try:
            return sum(1 for s in json.loads(r.stdout).get("shards", [])
                       if s.get("ready") and s.get("state") == "running")
        except ValueError:
            return -1

    played = False
    load = None
    ctr = POD + "-agent"
    try:
        r = podman("kube", "play", "--configmap", cm_path, "--seccomp-profile-root", seccomp_root, pod_path)
        played = True
        check(r.returncode == 0, "pod played" + ("" if r.returncode == 0 else ": " + r.stderr.strip()[-500:]))
        url = "http://127.0.0.1:%d/" % port
        if not check(wait_for(lambda: http(url)[0] == 200, 30), "pod answers HTTP"):
            print(podman("logs", ctr).stderr[-3000:])
            return 1
        check(wait_for(lambda: status().get("appliedGeneration") == 1, 15),
              "declarative mode, generation 1 applied: %s" % status())
        check(wait_for(lambda: ready_shards() == 2, 15), "2 shards ready")
        mounts = json.loads(inspect(ctr, "{{json .Mounts}}"))
        volume = [m["Source"] for m in mounts if m["Destination"] == "/etc/portfleet"]
        if not check(len(volume) == 1 and os.path.isfile(os.path.join(volume[0], "fleet.textproto")),
                     "ConfigMap volume on the host: %s" % volume):
            return 1
        volume = volume[0]

        load = subprocess.Popen([os.path.join(BUILD, "tests/portfleet-loadgen"), "--target", "127.0.0.1:%d" % port,
                                 "--rate", "200", "--duration", "20s"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        # The kubelet's layout with the same bytes: nothing to apply.
        kubelet_layout(volume, spec, "v1")
        time.sleep(1)
        check(status().get("appliedGeneration") == 1 and not status().get("error"),
              "kubelet layout of the same ConfigMap: no new generation")
        t0 = time.time()
        kubelet_layout(volume, spec.replace("shards: 2", "shards: 3"), "v2")
        applied = wait_for(lambda: status().get("appliedGeneration") == 2 and not status().get("reconciling"), 30)
        check(applied, "ConfigMap change (..data swap) applied as generation 2 in %.1fs" % (time.time() - t0))
        check(wait_for(lambda: ready_shards() == 3, 20), "3 shards ready")

        kubelet_layout(volume, spec + "listeners { name: \"broken\" shards: }\n", "v3")
        check(wait_for(lambda: "fleet.textproto" in status().get("error", ""), 20),
              "broken ConfigMap rejected: %s" % status().get("error", "")[:200])
        events = run(*ctl, "events", "--type", "config-rejected", "-o", "json").stdout
        check('"config-rejected"' in events, "config-rejected event")
        scale = run(*ctl, "scale", "web", "--shards", "1")
        check(scale.returncode == 1 and "--config-mode=declarative" in scale.stderr,
              "portfleetctl scale refused: %s" % scale.stderr.strip()[:200])
        check(ready_shards() == 3 and http(url)[0] == 200, "still serving 3 shards")
        out, _ = load.communicate(timeout=60)  # runs its 20 s
        load = None
        print(out.strip())
        m = re.search(r"ok=(\d+) failed=(\d+)", out)
        check(m is not None and int(m.group(2)) == 0 and int(m.group(1)) > 500,
              "load: %s" % (m.group(0) if m else out[-200:]))
        podman("pod", "stop", "-t", "30", POD)
        check(inspect(ctr, "{{.State.ExitCode}}") == "0", "pod stopped with exit 0")
    finally:
        if load is not None:
            load.kill()
        if played:
            if failures:
                print(podman("logs", ctr).stderr[-4000:])
            podman("pod", "rm", "-f", "-t", "5", POD)
            podman("volume", "rm", "-f", cm["metadata"]["name"])
        shutil.rmtree(bpffs, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print("%d failure(s)" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
