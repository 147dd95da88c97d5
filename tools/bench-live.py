#!/usr/bin/env python3
"""Live-migration benchmark (issue 3), one invocation, ratios against a
baseline measured in the same run.

1. Baseline: the idle 1 GiB migration (no guest writing), timed as the
   `send` process, median of N runs.
2. Live: a `livemig stress` guest, its RAM the same random 1 GiB image,
   writing `random` pages at 256 MiB/s with 2 threads, 2 channels over loopback TCP, --downtime-limit 300ms: every run
   must complete with measured downtime <= 300 ms and total time <= 2x the
   idle median.
3. Hard: the guest at 1 GiB/s with --max-bandwidth 512MiB/s --auto-converge:
   must complete with downtime <= 300 ms.

Every run checks that the destination RAM equals the source RAM at the pause.
usage: tools/bench-live.py [--size-mib 1024] [--runs 5] [--no-build]
"""
import argparse, filecmp, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".build", "release", "livemig")
PORT = [46000]
IDLE_IMAGE = [""]


def port():
    PORT[0] += 1
    return PORT[0]


def start_receiver(dst, addr, extra=()):
    r = subprocess.Popen([BIN, "receive", "--ram", dst, "--listen", addr, "--format", "json", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = r.stderr.readline()
    if "listening" not in line:
        sys.exit(f"receiver failed: {line}{r.stderr.read()}")
    return r


def idle_run(src, dst, size):
    addr = f"tcp:127.0.0.1:{port()}"
    r = start_receiver(dst, addr, ["--size", f"{size}B"])
    t0 = time.perf_counter()
    s = subprocess.run([BIN, "send", "--ram", src, "--to", addr, "--format", "json"], capture_output=True, text=True)
    t = time.perf_counter() - t0
    r.communicate(timeout=120)
    if s.returncode or r.returncode:
        sys.exit(f"idle migration failed: {s.stderr}")
    return t


def live_run(d, size, rate, extra):
    src, ctl, dst, dctl = (os.path.join(d, n) for n in ("src.ram", "src.ctl", "dst.ram", "dst.ctl"))
    for p in (src, ctl, dst, dctl):
        if os.path.exists(p):
            os.unlink(p)
    # The guest's RAM starts as the same kind of image the idle run moves
    # (random bytes in every page), so the comparison is like for like.
    shutil.copyfile(IDLE_IMAGE[0], src)
    g = subprocess.Popen([BIN, "stress", "--ram", src, "--control", ctl, "--pattern", "random",
                          "--threads", "2", "--rate", rate], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if "guest started" not in g.stderr.readline():
        sys.exit("guest did not start")
    # The guest's first writes fault its RAM in; give it a moment to reach its rate.
    time.sleep(1.0)
    addr = f"tcp:127.0.0.1:{port()}"
    r = start_receiver(dst, addr, ["--size", f"{size}B", "--guest", dctl])
    t0 = time.perf_counter()
    s = subprocess.run([BIN, "send", "--ram", src, "--to", addr, "--guest", ctl, "--format", "json", *extra],
                       capture_output=True, text=True)
    t = time.perf_counter() - t0
    r.communicate(timeout=120)
    gout, _ = g.communicate(timeout=30)
    if s.returncode != 0:
        return {"ok": False, "time": t, "error": s.stderr.strip()}
    stats = json.loads(s.stdout.strip().splitlines()[-1])
    same = filecmp.cmp(src, dst, shallow=False)
    rate_line = next((l for l in gout.splitlines() if "dirty rate achieved" in l), "")
    return {"ok": same, "time": t, "downtime": stats.get("downtime"), "rounds": stats["ram"]["dirty-sync-count"],
            "throttle": stats.get("cpu-throttle-percentage"), "guest": rate_line.split("achieved")[-1].strip(),
            "error": None if same else "destination differs from the source at the pause"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["swift", "build", "-c", "release", "--product", "livemig", "--static-swift-stdlib"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    size = a.size_mib << 20
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="livemig-bench-live-")
    ok = True
    try:
        src, dst = os.path.join(d, "idle-src.ram"), os.path.join(d, "idle-dst.ram")
        IDLE_IMAGE[0] = src
        with open("/dev/urandom", "rb") as rd, open(src, "wb") as w:
            for _ in range(a.size_mib // 64):
                w.write(rd.read(64 << 20))
        idle = []
        for i in range(a.runs):
            if os.path.exists(dst):
                os.unlink(dst)
            idle.append(idle_run(src, dst, size))
            print(f"idle  run {i + 1}: {idle[-1]:.3f} s", flush=True)
        os.unlink(dst)
        base = statistics.median(idle)
        print(f"idle median: {base:.3f} s -> live budget 2x = {2 * base:.3f} s\n", flush=True)

        for name, rate, extra, check_time in (
            ("random 256MiB/s", "256MiB/s", ["--downtime-limit", "300ms"], True),
            ("random 1GiB/s, --max-bandwidth 512MiB/s --auto-converge", "1GiB/s",
             ["--downtime-limit", "300ms", "--max-bandwidth", "512MiB/s", "--auto-converge"], False),
        ):
            runs = a.runs if check_time else max(1, a.runs // 2)
            print(f"case: guest {name}")
            for i in range(runs):
                res = live_run(d, size, rate, extra)
                good = res["ok"] and (res["downtime"] or 10**9) <= 300 and (not check_time or res["time"] <= 2 * base)
                ok &= good
                if res["error"]:
                    print(f"  run {i + 1}: FAILED {res['error']}")
                    continue
                print(f"  run {i + 1}: total {res['time']:.3f} s ({res['time'] / base:.2f}x idle), downtime {res['downtime']} ms, "
                      f"rounds {res['rounds']}, throttle {res['throttle']}%, guest dirtied {res['guest']}, "
                      f"byte-identical at pause -> {'OK' if good else 'NOT MET'}", flush=True)
    finally:
        subprocess.run(["rm", "-rf", d])
    print("\nall targets met" if ok else "\nSOME TARGETS NOT MET")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
