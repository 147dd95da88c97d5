import Synchronization
import Testing

@testable import QMP
@testable import URing

#if canImport(Glibc)
    import Glibc
#endif

/// A test client: a real connection, reading one JSON message per line.
final class LineClient {
    let socket: Socket
    private var pending: [UInt8] = []

    init(_ address: SocketAddress) throws {
        socket = try Socket.connect(to: address, timeout: 2)
        socket.setReceiveTimeout(10)
    }

    func send(_ text: String) throws { try socket.sendAll(Array(text.utf8)) }

    /// The next message the server sent (a line of JSON).
    func read() throws -> JSONValue {
        while true {
            if let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(pending[..<nl])
                pending.removeSubrange(...nl)
                return try JSONValue(parsing: line)
            }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = recv(socket.fd, &buf, buf.count, 0)
            guard n > 0 else { throw SocketError(.peerClosed, "the server closed the connection") }
            pending += buf[0..<n]
        }
    }

    /// The next reply, skipping events.
    func reply() throws -> JSONValue {
        while true {
            let m = try read()
            if m.objectValue?["event"] == nil { return m }
        }
    }

    /// Reads the greeting and negotiates.
    func negotiate() throws {
        _ = try read()
        try send(#"{"execute": "qmp_capabilities"}"#)
        #expect(try reply() == ["return": [:]])
    }
}

func temporarySocketPath(_ name: String) -> String { "/tmp/qmp-test-\(getpid())-\(name).sock" }

func makeServer(_ name: String, commands: [QMPCommand] = []) throws -> (QMPServer, SocketAddress) {
    let address = SocketAddress.unix(path: temporarySocketPath(name))
    let server = try QMPServer(
        address: address, version: QMPVersion(major: 9, minor: 2, micro: 0, package: "livemig"), commands: commands)
    server.start()
    return (server, address)
}

@Suite("QMP server over real sockets")
struct QMPServerTests {
    @Test func greetingAndNegotiation() throws {
        let (server, address) = try makeServer("greet")
        defer { server.close() }
        let c = try LineClient(address)
        let greeting = try c.read()
        #expect(
            greeting == [
                "QMP": ["version": ["qemu": ["major": 9, "minor": 2, "micro": 0], "package": "livemig"], "capabilities": []]
            ])
        // Before negotiation only qmp_capabilities is taken.
        try c.send(#"{"execute": "query-version", "id": 7}"#)
        #expect(
            try c.reply() == [
                "error": ["class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"],
                "id": 7,
            ])
        try c.send(#"{"execute": "qmp_capabilities", "id": "a"}"#)
        #expect(try c.reply() == ["return": [:], "id": "a"])
        try c.send(#"{"execute": "qmp_capabilities"}"#)
        #expect(
            try c.reply() == [
                "error": ["class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"]
            ])
        try c.send(#"{"execute": "query-version", "id": {"x": [1]}}"#)
        #expect(try c.reply() == ["return": ["qemu": ["major": 9, "minor": 2, "micro": 0], "package": "livemig"], "id": ["x": [1]]])
    }

    @Test func commandsArgumentsAndErrors() throws {
        let echo = QMPCommand("echo", arguments: ["text", "times"]) { args throws(QMPError) in
            let text = try args.string("text")
            let times = try args.optionalInt("times") ?? 1
            guard times >= 1 else { throw QMPError("times must be at least 1, got \(times)") }
            return .string(String(repeating: text, count: Int(times)))
        }
        let (server, address) = try makeServer("cmds", commands: [echo])
        defer { server.close() }
        let c = try LineClient(address)
        try c.negotiate()
        // Two requests in one write, no newline between them (qemu.qmp's way).
        try c.send(#"{"execute":"echo","arguments":{"text":"ab","times":2},"id":1}{"execute":"echo","arguments":{"text":"}{"},"id":2}"#)
        #expect(try c.reply() == ["return": "abab", "id": 1])
        #expect(try c.reply() == ["return": "}{", "id": 2])
        // Split across writes.
        try c.send(#"{"execute":"ec"#)
        try c.send(#"ho","arguments":{"text":"x"}}"#)
        #expect(try c.reply() == ["return": "x"])
        let cases: [(String, JSONValue)] = [
            (#"{"execute":"echo"}"#, ["class": "GenericError", "desc": "Parameter 'text' is missing"]),
            (
                #"{"execute":"echo","arguments":{"text":5}}"#,
                ["class": "GenericError", "desc": "Invalid parameter type for 'text', expected: string"]
            ),
            (
                #"{"execute":"echo","arguments":{"text":"a","bogus":1}}"#,
                ["class": "GenericError", "desc": "Parameter 'bogus' is unexpected"]
            ),
            (
                #"{"execute":"echo","arguments":{"text":"a","times":0}}"#,
                ["class": "GenericError", "desc": "times must be at least 1, got 0"]
            ),
            (#"{"execute":"nosuch"}"#, ["class": "CommandNotFound", "desc": "The command nosuch has not been found"]),
            (#"{"execute":"echo","arguments":[1]}"#, ["class": "GenericError", "desc": "QMP input member 'arguments' must be an object"]),
            (#"{"execute":3}"#, ["class": "GenericError", "desc": "QMP input member 'execute' must be a string"]),
            (#"{"arguments":{}}"#, ["class": "GenericError", "desc": "QMP input lacks member 'execute'"]),
            (#"{"execute":"echo","extra":1}"#, ["class": "GenericError", "desc": "QMP input member 'extra' is unexpected"]),
            (#"[1, 2]"#, ["class": "GenericError", "desc": "QMP input must be a JSON object"]),
        ]
        for (input, error) in cases {
            try c.send(input)
            #expect(try c.reply() == ["error": error], "for \(input)")
        }
        // query-commands lists the built-ins and ours.
        try c.send(#"{"execute":"query-commands"}"#)
        let names = try c.reply().objectValue?["return"]?.arrayValue?.compactMap { $0.objectValue?["name"]?.stringValue } ?? []
        #expect(Set(names) == ["echo", "qmp_capabilities", "query-version", "query-commands", "quit"])
    }

    @Test func malformedInputIsAnsweredAndTheConnectionLives() throws {
        let (server, address) = try makeServer("malformed")
        defer { server.close() }
        let c = try LineClient(address)
        try c.negotiate()
        for bad in ["hello world\n", "{\"execute\": tru}", "{\"a\": \"\u{1}\"}", "42\n"] {
            try c.send(bad)
            let r = try c.reply()
            #expect(r.objectValue?["error"]?.objectValue?["class"] == "GenericError", "for \(bad)")
        }
        // Too deep a nesting is refused, and the next line is read afresh.
        try c.send(String(repeating: "[", count: 100) + "\n")
        #expect(try c.reply().objectValue?["error"] != nil)
        try c.send(#"{"execute":"query-version"}"#)
        #expect(try c.reply().objectValue?["return"] != nil)
    }

    @Test func eventsReachEveryNegotiatedClientOnly() throws {
        let (server, address) = try makeServer("events")
        defer { server.close() }
        let a = try LineClient(address), b = try LineClient(address), silent = try LineClient(address)
        try a.negotiate()
        try b.negotiate()
        _ = try silent.read()  // greeting only; never negotiates
        server.emit("MIGRATION", data: ["status": "active"])
        for c in [a, b] {
            let e = try c.read()
            let o = e.objectValue ?? [:]
            #expect(o["event"] == "MIGRATION")
            #expect(o["data"] == ["status": "active"])
            let ts = o["timestamp"]?.objectValue ?? [:]
            #expect((ts["seconds"]?.intValue ?? 0) > 1_600_000_000)
            #expect((0..<1_000_000).contains(ts["microseconds"]?.intValue ?? -1))
        }
        // The silent client got no event: its next message is the error for
        // a command sent before negotiation.
        try silent.send(#"{"execute":"query-version"}"#)
        #expect(try silent.read().objectValue?["error"] != nil)
    }

    @Test func aClientThatLeavesStopsNothing() throws {
        let calls = Atomic<Int>(0)
        let count = QMPCommand("count") { _ in .int(Int64(calls.add(1, ordering: .relaxed).newValue)) }
        let (server, address) = try makeServer("leave", commands: [count])
        defer { server.close() }
        do {
            let gone = try LineClient(address)
            try gone.negotiate()
            try gone.send(#"{"execute":"count"}{"execute":"count"}"#)
            _ = try gone.reply()
        }  // closed here, maybe with a reply unread
        server.emit("X")
        let c = try LineClient(address)
        try c.negotiate()
        try c.send(#"{"execute":"count"}"#)
        #expect(try c.reply() == ["return": 3])
        #expect(!server.isQuitting)
    }

    @Test func quitRepliesThenEndsTheWait() throws {
        let (server, address) = try makeServer("quit")
        let c = try LineClient(address)
        try c.negotiate()
        try c.send(#"{"execute":"quit","id":1}"#)
        #expect(try c.reply() == ["return": [:], "id": 1])
        let shutdown = try c.read()
        #expect(shutdown.objectValue?["event"] == "SHUTDOWN")
        server.waitForQuit()
        #expect(server.isQuitting)
        server.close()
        #expect(access(temporarySocketPath("quit"), F_OK) != 0, "the socket file is removed")
    }

    @Test func aLiveListenersPathIsRefused() throws {
        let (server, _) = try makeServer("busy")
        defer { server.close() }
        #expect(throws: QMPError.self) {
            _ = try QMPServer(
                address: .unix(path: temporarySocketPath("busy")), version: QMPVersion(major: 1, minor: 0, micro: 0, package: "x"),
                commands: [])
        }
        do {
            _ = try QMPServer(
                address: .unix(path: temporarySocketPath("busy")), version: QMPVersion(major: 1, minor: 0, micro: 0, package: "x"),
                commands: [])
        } catch {
            #expect(error.desc.contains("another program is accepting there"))
        }
    }

    @Test func tcpIsLoopbackOnly() throws {
        #expect(throws: QMPError.self) {
            _ = try QMPServer(
                address: .tcp(host: "0.0.0.0", port: 0), version: QMPVersion(major: 1, minor: 0, micro: 0, package: "x"), commands: [])
        }
        let server = try QMPServer(
            address: .tcp(host: "127.0.0.1", port: 0), version: QMPVersion(major: 1, minor: 0, micro: 0, package: "x"), commands: [])
        server.start()
        defer { server.close() }
        let port = try #require(server.boundPort)
        let c = try LineClient(.tcp(host: "127.0.0.1", port: port))
        try c.negotiate()
    }
}

@Suite("QMP framing and values")
struct QMPFramingTests {
    @Test func framerSplitsBalancedTextsAndReportsGarbage() {
        var f = QMPInputFramer()
        #expect(f.feed(Array(#"{"a":"}\""}"#.utf8)) == [.message(Array(#"{"a":"}\""}"#.utf8))])
        #expect(f.feed(Array("  {\"b\"".utf8)) == [])
        #expect(f.feed(Array(":[1,{}]}\r\nxyz\n".utf8)).count == 2)
        var g = QMPInputFramer()
        #expect(g.feed(Array("\"str\"\n".utf8)) == [.malformed("QMP input must be a JSON object")])
    }

    @Test func valuesRoundTripWithIntegersKept() throws {
        let v: JSONValue = ["i": 9, "d": .double(0.5), "s": "x/y", "n": .null, "a": [true, false]]
        #expect(String(decoding: v.serialized, as: UTF8.self) == #"{"a":[true,false],"d":0.5,"i":9,"n":null,"s":"x/y"}"#)
        #expect(try JSONValue(parsing: v.serialized) == v)
        #expect(JSONValue.double(.nan).serialized == Array("null".utf8))
    }
}
