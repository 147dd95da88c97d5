#!/usr/bin/env python3
"""Core-issue benchmark: 1 GiB of random bytes on /dev/shm over loopback TCP.

Times the `livemig send` process (started once the receiver prints that it
listens; the receiver maps and pre-faults its file before that), checks the
destination is byte-identical after every run, and prints each run and the
median. A plain-sendmsg run of livemig is measured in the same invocation as
the baseline, so the io_uring path's ratio against it holds on a drifting
shared machine.

usage: tools/bench-core.py [--size-mib 1024] [--runs 5] [--channels 2]
"""
import argparse, filecmp, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".build", "release", "livemig")


def build():
    subprocess.run(["swift", "build", "-c", "release", "--product", "livemig", "--static-swift-stdlib"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def make_source(path, size):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open("/dev/urandom", "rb") as r, open(path, "wb") as w:
        left = size
        while left:
            chunk = r.read(min(left, 64 << 20))
            w.write(chunk)
            left -= len(chunk)


def one_run(src, dst, size, port, channels, extra):
    recv = subprocess.Popen([BIN, "receive", "--ram", dst, "--listen", f"tcp:127.0.0.1:{port}",
                             "--channels", str(channels), "--size", f"{size}B", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = recv.stderr.readline()
    if "listening" not in line:
        recv.kill()
        sys.exit(f"receiver did not start: {line}{recv.stderr.read()}")
    t0 = time.perf_counter()
    send = subprocess.run([BIN, "send", "--ram", src, "--to", f"tcp:127.0.0.1:{port}", "--channels",
                           str(channels), "--format", "json"] + extra, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    out, err = recv.communicate(timeout=60)
    if send.returncode != 0 or recv.returncode != 0:
        sys.exit(f"migration failed: send {send.returncode} {send.stderr} / receive {recv.returncode} {err}")
    if not filecmp.cmp(src, dst, shallow=False):
        sys.exit("destination differs from source")
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        build()
    size = a.size_mib << 20
    src, dst = "/dev/shm/livemig-bench-src.ram", "/dev/shm/livemig-bench-dst.ram"
    make_source(src, size)
    results = {}
    try:
        for name, extra in (("io_uring", []), ("plain sendmsg", ["--no-io-uring"])):
            times = []
            for i in range(a.runs):
                if os.path.exists(dst):
                    os.unlink(dst)
                times.append(one_run(src, dst, size, 47000 + i, a.channels, extra))
                print(f"{name:14s} run {i + 1}: send process {times[-1]:.3f} s "
                      f"({size / times[-1] / 1e9:.2f} GB/s), byte-identical", flush=True)
            results[name] = statistics.median(times)
    finally:
        for p in (src, dst):
            if os.path.exists(p):
                os.unlink(p)
    print()
    for name, med in results.items():
        print(f"median {name:14s}: {med:.3f} s  ({size / med / 1e9:.2f} GB/s)")
    print(f"ratio io_uring / plain sendmsg: {results['plain sendmsg'] / results['io_uring']:.2f}x faster"
          if results["io_uring"] <= results["plain sendmsg"]
          else f"ratio io_uring / plain sendmsg: {results['io_uring'] / results['plain sendmsg']:.2f}x slower")
    target = 0.55 * a.size_mib / 1024
    print(f"target (issue 2): median send process <= {target:.2f} s for {a.size_mib} MiB, 2 channels: "
          + ("MET" if results["io_uring"] <= target else "NOT MET"))


if __name__ == "__main__":
    main()
