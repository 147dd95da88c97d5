import CShims
import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

/// Where a migration listens or connects, in QEMU's URI style:
/// `tcp:HOST:PORT` (HOST may be `[v6]`) or `unix:PATH`.
public enum SocketAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    /// Parses `tcp:HOST:PORT` or `unix:PATH`.
    public init(parsing text: String) throws(SocketError) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw SocketError(.badAddress, "address '\(text)' has no path after 'unix:'") }
            guard path.utf8.count < 108 else {
                throw SocketError(.badAddress, "unix socket path '\(path)' is \(path.utf8.count) bytes; the limit is 107")
            }
            self = .unix(path: path)
        } else if text.hasPrefix("tcp:") {
            let rest = text.dropFirst(4)
            guard let colon = rest.lastIndex(of: ":") else {
                throw SocketError(.badAddress, "address '\(text)' lacks a port; write tcp:HOST:PORT")
            }
            var host = String(rest[..<colon])
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty else { throw SocketError(.badAddress, "address '\(text)' lacks a host; write tcp:HOST:PORT") }
            guard let port = UInt16(rest[rest.index(after: colon)...]) else {
                throw SocketError(.badAddress, "address '\(text)' has no valid port (0-65535)")
            }
            self = .tcp(host: host, port: port)
        } else {
            throw SocketError(.badAddress, "address '\(text)' must start with 'tcp:' or 'unix:' (tcp:HOST:PORT, unix:PATH)")
        }
    }

    /// Whether the address stays on this host: a Unix socket, `localhost`,
    /// 127.0.0.0/8 or ::1. (Names other than localhost count as remote.)
    public var isLoopback: Bool {
        switch self {
        case .unix: return true
        case .tcp(let host, _):
            if host == "localhost" || host == "::1" { return true }
            var addr = in_addr()
            return inet_pton(AF_INET, host, &addr) == 1 && UInt32(bigEndian: addr.s_addr) >> 24 == 127
        }
    }

    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        case .unix(let path): "unix:\(path)"
        }
    }

    /// Resolves to a socket address (first result of getaddrinfo for TCP).
    func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t, Int32) throws(SocketError) -> R) throws(SocketError) -> R {
        switch self {
        case .unix(let path):
            var sun = sockaddr_un()
            sun.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &sun.sun_path) { dst in
                for (i, b) in path.utf8.enumerated() { dst[i] = b }
            }
            let len = socklen_t(MemoryLayout<sa_family_t>.size + path.utf8.count + 1)
            return try withUnsafePointer(to: &sun) { p throws(SocketError) in
                try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa throws(SocketError) in try body(sa, len, AF_UNIX) }
            }
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_family = AF_UNSPEC
            var res: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &res)
            guard rc == 0, let ai = res else {
                throw SocketError(.badAddress, "cannot resolve host '\(host)': \(String(cString: gai_strerror(rc)))")
            }
            defer { freeaddrinfo(res) }
            return try body(ai.pointee.ai_addr, ai.pointee.ai_addrlen, ai.pointee.ai_family)
        }
    }
}
