#!/usr/bin/env python3
"""Several RAM blocks against one: does splitting a guest's RAM into blocks
cost anything on the wire path?

Each run migrates the same bytes twice, alternating, in one invocation:
  one     a single RAM file of 1 GiB + 16 MiB + 256 KiB (--ram PATH)
  blocks  the same bytes as three blocks pc.ram (1 GiB), vga.vram (16 MiB)
          and pc.rom (256 KiB) (--ram NAME=PATH per block)
Both destinations are created by receive at the layout (no --size), so both
take the same receive path. Every run checks the destination byte for byte.
Prints the medians and the ratio blocks / one (absolute times drift on
shared machines; the ratio within one invocation holds).

usage: tools/bench-blocks.py [--runs 5] [--channels 2] [--no-build]
"""
import argparse, filecmp, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".build", "release", "livemig")
SHM = "/dev/shm/livemig-bench-blocks"
BLOCKS = [("pc.ram", 1 << 30), ("vga.vram", 16 << 20), ("pc.rom", 256 << 10)]


def build():
    subprocess.run(["swift", "build", "-c", "release", "--product", "livemig"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def make_sources():
    """Three block files of pseudo-random pages (a quarter zero), and one
    file holding the same bytes back to back."""
    os.makedirs(SHM, exist_ok=True)
    whole = open(f"{SHM}/one.ram", "wb")
    seed = 1
    for name, size in BLOCKS:
        with open(f"{SHM}/src-{name}", "wb") as f:
            for page in range(size // 4096):
                seed = (seed * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
                data = bytes(4096) if seed >> 62 == 0 else seed.to_bytes(8, "little") * 512
                f.write(data)
                whole.write(data)
    whole.close()


def one_run(kind, port, channels):
    for f in os.listdir(SHM):
        if f.startswith("dst-"):
            os.unlink(f"{SHM}/{f}")
    if kind == "one":
        src, dst = ["--ram", f"{SHM}/one.ram"], ["--ram", f"{SHM}/dst-one"]
    else:
        src = sum((["--ram", f"{n}={SHM}/src-{n}"] for n, _ in BLOCKS), [])
        dst = sum((["--ram", f"{n}={SHM}/dst-{n}"] for n, _ in reversed(BLOCKS)), [])
    addr = f"tcp:127.0.0.1:{port}"
    recv = subprocess.Popen([BIN, "receive"] + dst + ["--listen", addr, "--channels", str(channels), "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while True:
        line = recv.stderr.readline()
        if "listening" in line or not line:
            break
    t0 = time.monotonic()
    send = subprocess.run([BIN, "send"] + src + ["--to", addr, "--channels", str(channels), "--format", "json"],
                          capture_output=True, text=True)
    out, err = recv.communicate(timeout=120)
    wall = time.monotonic() - t0
    if send.returncode != 0 or recv.returncode != 0:
        sys.exit(f"{kind}: send {send.returncode} {send.stderr} receive {recv.returncode} {err}")
    if kind == "one":
        same = filecmp.cmp(f"{SHM}/one.ram", f"{SHM}/dst-one", shallow=False)
    else:
        same = all(filecmp.cmp(f"{SHM}/src-{n}", f"{SHM}/dst-{n}", shallow=False) for n, _ in BLOCKS)
    if not same:
        sys.exit(f"{kind}: the destination differs from the source")
    return wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build()
    make_sources()
    try:
        times = {"one": [], "blocks": []}
        port = 47000 + os.getpid() % 1000
        # A warm-up pair first: the first run of an invocation pays first-touch costs.
        for kind in ("one", "blocks"):
            one_run(kind, port, args.channels)
        for i in range(args.runs):
            for kind in (("one", "blocks") if i % 2 == 0 else ("blocks", "one")):
                t = one_run(kind, port, args.channels)
                times[kind].append(t)
                print(f"run {i + 1} {kind:6s} {t:.3f} s", flush=True)
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"median: one block {m['one']:.3f} s, three blocks {m['blocks']:.3f} s, ratio blocks/one {m['blocks'] / m['one']:.3f}")
    finally:
        subprocess.run(["rm", "-rf", SHM])


if __name__ == "__main__":
    main()
