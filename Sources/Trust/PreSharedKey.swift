import Crypto

#if canImport(Glibc)
    import Glibc
#endif

/// The secret both ends of an authenticated migration hold (`--psk-file`).
///
/// File format: the key as hexadecimal text, at least 64 hex digits (32
/// bytes), optionally followed by one newline. `livemig keygen` writes 32
/// random bytes that way with mode 0600. A key file that other users may
/// read is refused, as OpenSSH refuses such private keys.
public struct PreSharedKey: Sendable {
    /// The shortest key accepted, in bytes.
    public static let minimumBytes = 32
    /// The longest key file read, in bytes (a key is never this long).
    static let maximumFileBytes = 4096

    let key: SymmetricKey

    /// A key from raw bytes (tests); at least `minimumBytes`.
    public init(bytes: [UInt8]) throws(TrustError) {
        guard bytes.count >= Self.minimumBytes else {
            throw TrustError("a pre-shared key is at least \(Self.minimumBytes) bytes; this one has \(bytes.count)")
        }
        key = SymmetricKey(data: bytes)
    }

    /// Reads a key file written by `livemig keygen` (or by hand: hex text).
    public static func load(path: String) throws(TrustError) -> PreSharedKey {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw TrustError("cannot open key file \(path): \(String(cString: strerror(errno))); create one with `livemig keygen \(path)`")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
            throw TrustError("key file \(path) is not a regular file")
        }
        guard st.st_mode & 0o077 == 0 else {
            throw TrustError(
                "key file \(path) may be read by other users (mode \(String(st.st_mode & 0o777, radix: 8))); run `chmod 600 \(path)`")
        }
        var bytes = [UInt8](repeating: 0, count: maximumFileBytes + 1)
        var filled = 0
        while filled < bytes.count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + filled, $0.count - filled) }
            if n < 0, errno == EINTR { continue }
            guard n >= 0 else { throw TrustError("cannot read key file \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            filled += n
        }
        guard filled <= maximumFileBytes else {
            throw TrustError("key file \(path) is larger than \(maximumFileBytes) bytes; it is not a key")
        }
        var text = bytes[..<filled]
        if text.last == UInt8(ascii: "\n") { text = text.dropLast() }
        guard let decoded = Self.hexDecode(text) else {
            throw TrustError(
                "key file \(path) is not a key: it must hold hexadecimal digits only (as `livemig keygen` writes them)")
        }
        do {
            return try PreSharedKey(bytes: decoded)
        } catch {
            throw TrustError("key file \(path): \(error.description); make a new one with `livemig keygen`")
        }
    }

    /// Writes a new random key of `minimumBytes` bytes to `path` (mode 0600).
    /// An existing file is never overwritten: it may be the key in use.
    public static func generate(path: String) throws(TrustError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let e = errno
            if e == EEXIST { throw TrustError("\(path) exists; remove it first or choose another path (a key is never overwritten)") }
            throw TrustError("cannot create key file \(path): \(String(cString: strerror(e)))")
        }
        let secret = SymmetricKey(size: .bits256)
        let text = Array(secret.withUnsafeBytes { Self.hexEncode($0) }.utf8) + [UInt8(ascii: "\n")]
        var done = 0
        while done < text.count {
            let n = text.withUnsafeBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                let e = errno
                close(fd)
                unlink(path)
                throw TrustError("cannot write key file \(path): \(String(cString: strerror(e)))")
            }
            done += n
        }
        guard fsync(fd) == 0, close(fd) == 0 else {
            unlink(path)
            throw TrustError("cannot write key file \(path): \(String(cString: strerror(errno)))")
        }
    }

    static func hexEncode(_ bytes: UnsafeRawBufferPointer) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func hexDecode(_ text: ArraySlice<UInt8>) -> [UInt8]? {
        guard !text.isEmpty, text.count % 2 == 0 else { return nil }
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        var out = [UInt8]()
        var i = text.startIndex
        while i < text.endIndex {
            guard let hi = nibble(text[i]), let lo = nibble(text[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}
