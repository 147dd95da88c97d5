#!/usr/bin/env python3
"""Records a real migration and cuts it into fuzz seeds (Fuzz/corpus/).

    Fuzz/capture.py proxy LISTEN_PATH TARGET_PATH OUT_DIR
        A Unix-socket proxy: every connection to LISTEN_PATH is relayed to
        TARGET_PATH, and its bytes are saved as OUT_DIR/connN.s2d (source to
        destination) and OUT_DIR/connN.d2s. Stops after 60 s without a new
        connection or when killed.
    Fuzz/capture.py split OUT_DIR CORPUS_DIR [NAME]
        Cuts the recorded streams along protocol 2 (docs/PROTOCOL.md, the doc
        comments in Sources/MigrationWire) into seeds per target.
"""
import os, socket, struct, sys, threading, zlib

HELLO, CHALLENGE, PROOF, FRAME_HEAD, TAG = 64, 80, 32, 8, 16
PACKET_HEAD, ENTRY, PAGE = 48, 16, 4096


def proxy(listen, target, out):
    os.makedirs(out, exist_ok=True)
    if os.path.exists(listen):
        os.unlink(listen)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen)
    srv.listen(64)
    srv.settimeout(60)
    n = 0

    def pump(a, b, path):
        with open(path, "wb") as f:
            while True:
                try:
                    d = a.recv(1 << 16)
                except OSError:
                    d = b""
                if not d:
                    try:
                        b.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                f.write(d)
                f.flush()
                try:
                    b.sendall(d)
                except OSError:
                    return

    while True:
        try:
            c, _ = srv.accept()
        except socket.timeout:
            return
        t = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        t.connect(target)
        base = os.path.join(out, "conn%d" % n)
        n += 1
        threading.Thread(target=pump, args=(c, t, base + ".s2d"), daemon=True).start()
        threading.Thread(target=pump, args=(t, c, base + ".d2s"), daemon=True).start()


def frames(stream):
    """(frame without tag, frame with tag) of a main-channel stream."""
    pos = 0
    while len(stream) - pos >= FRAME_HEAD:
        length = struct.unpack_from(">I", stream, pos + 4)[0]
        end = pos + FRAME_HEAD + length
        if end + TAG > len(stream):
            return
        yield stream[pos:end], stream[pos:end + TAG]
        pos = end + TAG


def packets(stream):
    """(header + entries, whole packet) of a multifd channel stream (no key)."""
    pos = 0
    while len(stream) - pos >= PACKET_HEAD:
        normal, zero, payload = struct.unpack_from(">III", stream, pos + 12)
        prefix = PACKET_HEAD + (normal + zero) * ENTRY
        if pos + prefix + payload > len(stream):
            return
        yield stream[pos:pos + prefix], stream[pos:pos + prefix + payload]
        pos += prefix + payload


def split(out, corpus, name="capture"):
    def save(target, data, tag):
        d = os.path.join(corpus, target)
        os.makedirs(d, exist_ok=True)
        # Named by content: the same bytes from two captures are one seed.
        crc = "%08x" % zlib.crc32(data)
        if any(f.endswith("-" + crc) for f in os.listdir(d)):
            return
        path = os.path.join(d, "%s-%s-%s" % (name, tag, crc))
        with open(path, "wb") as f:
            f.write(data)

    conns = sorted({f.rsplit(".", 1)[0] for f in os.listdir(out)})
    main, channels, compressed = b"", [], False
    for c in conns:
        s2d = open(os.path.join(out, c + ".s2d"), "rb").read()
        d2s = open(os.path.join(out, c + ".d2s"), "rb").read()
        if len(s2d) < HELLO:
            continue
        hello = s2d[:HELLO]
        save("hello", hello, "hello")
        if len(d2s) >= CHALLENGE:
            save("hello", d2s[:CHALLENGE], "challenge")
        kind, compression = hello[24], hello[25]
        keyed = struct.unpack_from(">H", hello, 30)[0] & 2
        body = s2d[HELLO + PROOF:]
        if kind == 1:
            main, compressed = (b"" if keyed else body), compression == 1
            for frame, _ in frames(body):
                save("main-message", frame, "s2d")
                if struct.unpack_from(">H", frame)[0] == 5:  # guest-state
                    save("stress-state", frame[FRAME_HEAD:], "guest")
            for frame, _ in frames(d2s[CHALLENGE:]):
                save("main-message", frame, "d2s")
        elif not keyed:  # the packet and receiver targets run without a key
            channels.append(body)
            for prefix, _ in packets(body):
                save("packet", prefix, "packet")
    # The receiver target: config, main-stream length, main stream, then
    # one channel's stream (each channel's in turn).
    for i, ch in enumerate(channels if main else []):
        seed = bytes([1 if compressed else 0]) + struct.pack(">I", len(main)) + main + ch
        save("receiver", seed, "ch%d" % i)


if __name__ == "__main__":
    if sys.argv[1] == "proxy":
        proxy(*sys.argv[2:5])
    elif sys.argv[1] == "split":
        split(*sys.argv[2:])
    else:
        sys.exit(__doc__)
