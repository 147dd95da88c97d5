/// QMP's error classes (QEMU's `QapiErrorClass`), the two a client sees here.
public enum QMPErrorClass: String, Sendable {
    case genericError = "GenericError"
    case commandNotFound = "CommandNotFound"
}

/// A command's failure, sent as `{"error": {"class": ..., "desc": ...}}`.
public struct QMPError: Error, Sendable, Equatable, CustomStringConvertible {
    public var errorClass: QMPErrorClass
    public var desc: String

    public init(_ errorClass: QMPErrorClass, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    /// A `GenericError`.
    public init(_ desc: String) { self.init(.genericError, desc) }

    public var description: String { "\(errorClass.rawValue): \(desc)" }
}

/// What a command handler gets: its arguments, with accessors that refuse
/// a missing or mistyped one in QEMU's words ("Parameter 'uri' is
/// missing", "Invalid parameter type for 'uri', expected: string").
public struct QMPArguments: Sendable {
    public let values: [String: JSONValue]

    public init(_ values: [String: JSONValue] = [:]) { self.values = values }

    public subscript(name: String) -> JSONValue? { values[name] }

    public func string(_ name: String) throws(QMPError) -> String {
        guard let v = try optionalString(name) else { throw QMPError("Parameter '\(name)' is missing") }
        return v
    }

    public func optionalString(_ name: String) throws(QMPError) -> String? {
        guard let v = values[name] else { return nil }
        guard let s = v.stringValue else { throw Self.wrongType(name, "string") }
        return s
    }

    public func optionalBool(_ name: String) throws(QMPError) -> Bool? {
        guard let v = values[name] else { return nil }
        guard let b = v.boolValue else { throw Self.wrongType(name, "boolean") }
        return b
    }

    public func bool(_ name: String) throws(QMPError) -> Bool {
        guard let v = try optionalBool(name) else { throw QMPError("Parameter '\(name)' is missing") }
        return v
    }

    public func optionalInt(_ name: String) throws(QMPError) -> Int64? {
        guard let v = values[name] else { return nil }
        guard let i = v.intValue else { throw Self.wrongType(name, "integer") }
        return i
    }

    public func int(_ name: String) throws(QMPError) -> Int64 {
        guard let v = try optionalInt(name) else { throw QMPError("Parameter '\(name)' is missing") }
        return v
    }

    public func array(_ name: String) throws(QMPError) -> [JSONValue] {
        guard let v = values[name] else { throw QMPError("Parameter '\(name)' is missing") }
        guard let a = v.arrayValue else { throw Self.wrongType(name, "array") }
        return a
    }

    public static func wrongType(_ name: String, _ expected: String) -> QMPError {
        QMPError("Invalid parameter type for '\(name)', expected: \(expected)")
    }
}

/// One command the server knows: its name, the argument names it takes
/// (any other is refused as "Parameter 'x' is unexpected" before the
/// handler runs) and the handler, which runs on the client's thread and
/// must return quickly (a migration runs on a thread of its own).
public struct QMPCommand: Sendable {
    public typealias Handler = @Sendable (QMPArguments) throws(QMPError) -> JSONValue

    public let name: String
    public let arguments: Set<String>
    public let handler: Handler

    public init(_ name: String, arguments: Set<String> = [], _ handler: @escaping Handler) {
        self.name = name
        self.arguments = arguments
        self.handler = handler
    }
}

/// The version a server announces in its greeting and `query-version`.
public struct QMPVersion: Sendable, Equatable {
    public var major: Int64
    public var minor: Int64
    public var micro: Int64
    public var package: String

    public init(major: Int64, minor: Int64, micro: Int64, package: String) {
        self.major = major
        self.minor = minor
        self.micro = micro
        self.package = package
    }

    /// `query-version`'s return value, also the greeting's `version`.
    public var json: JSONValue {
        ["qemu": ["major": .int(major), "minor": .int(minor), "micro": .int(micro)], "package": .string(package)]
    }
}

/// Splits a client's byte stream into JSON texts, as QEMU's JSON streamer
/// does: a message is a balanced `{...}` (or `[...]`), with or without a
/// newline after it (`qemu.qmp` sends none). Anything else at the top
/// level is taken up to the end of its line and reported as malformed, so
/// the server answers it with an error instead of waiting or giving up on
/// the client.
public struct QMPInputFramer: Sendable {
    /// One complete piece of input.
    public enum Piece: Sendable, Equatable {
        /// A balanced JSON text, to parse.
        case message([UInt8])
        /// Input that cannot be a message; the error to answer with.
        case malformed(String)
    }

    /// The longest message taken (QEMU allows more; nothing here needs it).
    public static let maxMessageBytes = 1 << 20
    /// The deepest nesting taken (QEMU's limit is 1024).
    public static let maxDepth = 64

    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    /// Collecting top-level garbage up to the end of its line.
    private var inGarbage = false
    /// After an oversized or too deep message: drop bytes to the end of
    /// the line, then start afresh.
    private var skipping = false

    public init() {}

    /// Takes the bytes just read; returns the pieces they complete.
    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [Piece] {
        var out: [Piece] = []
        for b in bytes { step(b, &out) }
        return out
    }

    private mutating func step(_ b: UInt8, _ out: inout [Piece]) {
        if skipping {
            if b == UInt8(ascii: "\n") { skipping = false }
            return
        }
        if inGarbage {
            if b == UInt8(ascii: "\n") {
                out.append(.malformed(Self.describeGarbage(buffer)))
                buffer.removeAll(keepingCapacity: true)
                inGarbage = false
            } else if buffer.count < 256 {
                buffer.append(b)
            }
            return
        }
        if depth == 0 {
            switch b {
            case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\r"), UInt8(ascii: "\n"): return
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth = 1
                buffer = [b]
            default:
                inGarbage = true
                buffer = [b]
            }
            return
        }
        buffer.append(b)
        if inString {
            if escaped {
                escaped = false
            } else if b == UInt8(ascii: "\\") {
                escaped = true
            } else if b == UInt8(ascii: "\"") {
                inString = false
            }
        } else {
            switch b {
            case UInt8(ascii: "\""): inString = true
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
                if depth > Self.maxDepth {
                    out.append(.malformed("JSON parse error, nesting too deep (more than \(Self.maxDepth) levels)"))
                    reset(skipToLineEnd: true)
                    return
                }
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
                if depth == 0 {
                    out.append(.message(buffer))
                    reset(skipToLineEnd: false)
                    return
                }
            default: break
            }
        }
        if buffer.count > Self.maxMessageBytes {
            out.append(.malformed("JSON parse error, message longer than \(Self.maxMessageBytes) bytes"))
            reset(skipToLineEnd: true)
        }
    }

    private mutating func reset(skipToLineEnd: Bool) {
        buffer.removeAll(keepingCapacity: true)
        depth = 0
        inString = false
        escaped = false
        skipping = skipToLineEnd
    }

    private static func describeGarbage(_ bytes: [UInt8]) -> String {
        if (try? JSONValue(parsing: bytes)) != nil { return "QMP input must be a JSON object" }
        let text = String(decoding: bytes.prefix(40), as: UTF8.self).trimmingTrailingWhitespace
        return "JSON parse error, invalid input '\(text)'"
    }
}

extension String {
    fileprivate var trimmingTrailingWhitespace: String {
        var s = Substring(self)
        while let last = s.last, last.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}

/// One client's side of the protocol, without I/O: capabilities
/// negotiation, the checks of a request's members, dispatch, and the
/// reply. The server runs one per connection.
public struct QMPSession: Sendable {
    /// `qmp_capabilities` succeeded: commands and events flow.
    public private(set) var negotiated = false
    let commands: [String: QMPCommand]

    public init(commands: [String: QMPCommand]) { self.commands = commands }

    /// What to do after answering.
    public enum After: Sendable, Equatable {
        case none
        /// The client asked the process to end (`quit`).
        case quit
    }

    /// The reply to one piece of input, and what follows it.
    public mutating func handle(_ piece: QMPInputFramer.Piece) -> (reply: JSONValue, after: After) {
        switch piece {
        case .malformed(let why): return (Self.errorReply(QMPError(why), id: nil), .none)
        case .message(let bytes):
            let value: JSONValue
            do {
                value = try JSONValue(parsing: bytes)
            } catch {
                return (Self.errorReply(QMPError("JSON parse error, the input is not valid JSON"), id: nil), .none)
            }
            return handle(value)
        }
    }

    /// The reply to one parsed message.
    public mutating func handle(_ message: JSONValue) -> (reply: JSONValue, after: After) {
        guard let members = message.objectValue else {
            return (Self.errorReply(QMPError("QMP input must be a JSON object"), id: nil), .none)
        }
        let id = members["id"]
        do throws(QMPError) {
            let (name, arguments) = try Self.request(members)
            if !negotiated {
                guard name == "qmp_capabilities" else {
                    throw QMPError(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'")
                }
                try Self.checkCapabilities(arguments)
                negotiated = true
                return (Self.returnReply([:], id: id), .none)
            }
            if name == "qmp_capabilities" {
                throw QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored")
            }
            guard let command = commands[name] else {
                throw QMPError(.commandNotFound, "The command \(name) has not been found")
            }
            for key in arguments.values.keys.sorted() where !command.arguments.contains(key) {
                throw QMPError("Parameter '\(key)' is unexpected")
            }
            let result = try command.handler(arguments)
            return (Self.returnReply(result, id: id), name == "quit" ? .quit : .none)
        } catch {
            return (Self.errorReply(error, id: id), .none)
        }
    }

    /// The command name and arguments of a request, checked as QEMU does.
    static func request(_ members: [String: JSONValue]) throws(QMPError) -> (String, QMPArguments) {
        for key in members.keys.sorted() where !["execute", "arguments", "id"].contains(key) {
            if key == "exec-oob" { throw QMPError("QMP input member 'exec-oob' is not supported (no out-of-band capability)") }
            throw QMPError("QMP input member '\(key)' is unexpected")
        }
        guard let execute = members["execute"] else { throw QMPError("QMP input lacks member 'execute'") }
        guard let name = execute.stringValue else { throw QMPError("QMP input member 'execute' must be a string") }
        guard let raw = members["arguments"] else { return (name, QMPArguments()) }
        guard let arguments = raw.objectValue else { throw QMPError("QMP input member 'arguments' must be an object") }
        return (name, QMPArguments(arguments))
    }

    /// `qmp_capabilities` takes `enable`, a list of capabilities to turn
    /// on; this server offers none (no `oob`).
    static func checkCapabilities(_ arguments: QMPArguments) throws(QMPError) {
        for key in arguments.values.keys.sorted() where key != "enable" { throw QMPError("Parameter '\(key)' is unexpected") }
        guard arguments["enable"] != nil else { return }
        for v in try arguments.array("enable") {
            guard let name = v.stringValue else { throw QMPArguments.wrongType("enable", "array of strings") }
            throw QMPError("Capability '\(name)' is not available (this server offers none)")
        }
    }

    public static func returnReply(_ value: JSONValue, id: JSONValue?) -> JSONValue {
        var o: [String: JSONValue] = ["return": value]
        if let id { o["id"] = id }
        return .object(o)
    }

    public static func errorReply(_ error: QMPError, id: JSONValue?) -> JSONValue {
        var o: [String: JSONValue] = ["error": ["class": .string(error.errorClass.rawValue), "desc": .string(error.desc)]]
        if let id { o["id"] = id }
        return .object(o)
    }
}
