import Migration
import MigrationWire
import QMP

/// A setting refused: the same words whether it came from the command line
/// or from QMP; only the name differs ("--throttle-initial" or
/// "cpu-throttle-initial"), so the user recognises what they typed.
struct SettingError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The checks both ways in share: the command line's options and QMP's
/// capabilities and parameters are one set of settings.
enum SettingCheck {
    static func channels(_ n: Int64, _ name: String) throws(SettingError) -> Int {
        guard (1...64).contains(n) else { throw SettingError("\(name) must be from 1 to 64, got \(n)") }
        return Int(n)
    }

    static func throttlePercent(_ n: Int64, _ name: String) throws(SettingError) -> Int {
        guard (1...99).contains(n) else { throw SettingError("\(name) must be from 1 to 99 (percent), got \(n)") }
        return Int(n)
    }

    static func zstdLevel(_ n: Int64, _ name: String) throws(SettingError) -> Int32 {
        let levels = Zstd.levels
        guard let level = Int32(exactly: n), levels.contains(level) else {
            throw SettingError(
                "\(name): '\(n)' is not a zstd level; this libzstd (\(Zstd.version)) takes \(levels.lowerBound) to \(levels.upperBound) (default \(Zstd.defaultLevel))"
            )
        }
        return level
    }

    static func compressionMethod(_ text: String, _ name: String) throws(SettingError) -> CompressionMethod {
        switch text {
        case "none": return .none
        case "zstd": return .zstd
        default: throw SettingError("\(name): '\(text)' is not a method; use none or zstd")
        }
    }

    static func maxRounds(_ n: Int64, _ name: String) throws(SettingError) -> Int {
        guard n >= 1, let v = Int(exactly: n) else { throw SettingError("\(name) must be at least 1, got \(n)") }
        return v
    }

    static func postcopyAfterRounds(_ n: Int64, _ name: String) throws(SettingError) -> Int {
        guard n >= 0, let v = Int(exactly: n) else { throw SettingError("\(name) must be 0 or more, got \(n)") }
        return v
    }

    /// QEMU's bound for downtime-limit, in milliseconds.
    static let maxDowntimeMilliseconds: Int64 = 2_000_000

    static func milliseconds(_ n: Int64, _ name: String, max: Int64 = 10_000_000_000) throws(SettingError) -> Double {
        guard (0...max).contains(n) else { throw SettingError("\(name) must be from 0 to \(max) milliseconds, got \(n)") }
        return Double(n) / 1000
    }

    static func bandwidth(_ n: Int64, _ name: String) throws(SettingError) -> UInt64? {
        guard n >= 0 else { throw SettingError("\(name) must be 0 (unlimited) or a rate in bytes per second, got \(n)") }
        return n == 0 ? nil : UInt64(n)
    }
}

/// The source's settings: QEMU's migration capabilities and parameters,
/// filled by `livemig send`'s options or by QMP's `migrate-set-*`, and the
/// one thing `SourceConfig` takes them from (`apply(to:)`).
struct SourceSettings: Sendable, Equatable {
    // Capabilities.
    var autoConverge = false
    var postcopyRAM = false
    var zeroCopySend = false
    var postcopyPreempt = true
    /// QMP only: MIGRATION and MIGRATION_PASS events (QEMU's default: off).
    var events = false

    // Parameters.
    var channels = 2
    var downtimeLimit = 0.3
    var maxBandwidth: UInt64?
    var throttleInitial = Int(AutoConverge.initial)
    var throttleIncrement = Int(AutoConverge.increment)
    var compressionMethod = CompressionMethod.none
    var zstdLevel = Zstd.defaultLevel
    var maxRounds: Int?
    var convergeTimeout: Double?
    /// Precopy rounds before the postcopy switch; nil: only when asked
    /// (`migrate-start-postcopy`, SIGUSR1), as QEMU, the default with QMP.
    var postcopyAfterRounds: Int? = 1
    var switchoverTimeout: Double?

    var compression: CompressionSetting {
        compressionMethod == .none ? .none : CompressionSetting(method: compressionMethod, level: zstdLevel)
    }

    /// Fills the settings' part of a source configuration.
    func apply(to config: inout SourceConfig) {
        config.channels = channels
        config.zeroCopy = zeroCopySend
        config.compression = compression
        config.policy.downtimeLimit = downtimeLimit
        config.switchoverTimeout = switchoverTimeout
        config.policy.maxBandwidth = maxBandwidth.map { Double($0) }
        config.policy.autoConverge = autoConverge
        config.policy.throttleInitial = UInt32(throttleInitial)
        config.policy.throttleIncrement = UInt32(throttleIncrement)
        config.policy.maxRounds = maxRounds
        config.policy.timeout = convergeTimeout
        config.postcopy = postcopyRAM
        config.postcopyAfterRounds = postcopyAfterRounds ?? Int.max
        config.postcopyPreempt = postcopyPreempt
    }

    /// The checks that need the whole set and the process's start-up
    /// (a guest or not, io_uring or not). `names` picks the words.
    func checkCombination(live: Bool, useRing: Bool, qmp: Bool) throws(SettingError) {
        if zeroCopySend, !useRing {
            throw SettingError(
                qmp
                    ? "zero-copy-send needs io_uring; start livemig send without --no-io-uring"
                    : "--zerocopy needs io_uring; drop --no-io-uring")
        }
        if postcopyRAM, !live {
            throw SettingError(
                qmp
                    ? "postcopy-ram applies to live migration: start livemig send with --guest CONTROL"
                    : "--postcopy applies to live migration: add --guest CONTROL")
        }
        if qmp, !live, autoConverge || maxRounds != nil || convergeTimeout != nil || maxBandwidth != nil {
            throw SettingError(
                "auto-converge, x-max-rounds, x-converge-timeout and max-bandwidth apply to live migration: start livemig send with --guest CONTROL"
            )
        }
    }
}

/// The destination's settings (`livemig receive` options, QMP).
struct DestinationSettings: Sendable, Equatable {
    var channels = 2
    /// QMP only: MIGRATION events (QEMU's default: off).
    var events = false

    func apply(to config: inout DestinationConfig) { config.channels = channels }
}

/// Every migration capability QEMU knows (qapi/migration.json). One that a
/// side does not implement may be set false (as libvirt does), never true.
let qemuCapabilities: Set<String> = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo", "release-ram",
    "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate",
    "x-ignore-shared", "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack",
    "dirty-limit", "mapped-ram",
]

/// Reads QMP's `{"capabilities": [{"capability": NAME, "state": BOOL}, ...]}`.
func capabilityList(_ arguments: QMPArguments) throws(QMPError) -> [(String, Bool)] {
    var out: [(String, Bool)] = []
    for (i, entry) in try arguments.array("capabilities").enumerated() {
        guard let o = entry.objectValue else { throw QMPArguments.wrongType("capabilities[\(i)]", "object") }
        let item = QMPArguments(o)
        for key in o.keys.sorted() where key != "capability" && key != "state" {
            throw QMPError("Parameter 'capabilities[\(i)].\(key)' is unexpected")
        }
        out.append((try item.string("capability"), try item.bool("state")))
    }
    return out
}

/// `query-migrate-capabilities`' shape.
func capabilityReply(_ list: [(String, Bool)]) -> JSONValue {
    .array(list.map { ["capability": .string($0.0), "state": .bool($0.1)] })
}

extension SourceSettings {
    static let capabilityNames = ["multifd", "auto-converge", "postcopy-ram", "zero-copy-send", "postcopy-preempt", "events"]

    var capabilities: [(String, Bool)] {
        [
            ("multifd", true), ("auto-converge", autoConverge), ("postcopy-ram", postcopyRAM), ("zero-copy-send", zeroCopySend),
            ("postcopy-preempt", postcopyPreempt), ("events", events),
        ]
    }

    /// `migrate-set-capabilities`: all or nothing.
    func settingCapabilities(_ list: [(String, Bool)]) throws(SettingError) -> SourceSettings {
        var s = self
        for (name, state) in list {
            switch name {
            case "multifd":
                guard state else { throw SettingError("multifd cannot be turned off: livemig always migrates over multifd channels") }
            case "auto-converge": s.autoConverge = state
            case "postcopy-ram": s.postcopyRAM = state
            case "zero-copy-send": s.zeroCopySend = state
            case "postcopy-preempt": s.postcopyPreempt = state
            case "events": s.events = state
            default: try refuseUnknownCapability(name, state: state, known: Self.capabilityNames)
            }
        }
        return s
    }

    static let parameterNames: Set<String> = [
        "multifd-channels", "downtime-limit", "max-bandwidth", "cpu-throttle-initial", "cpu-throttle-increment",
        "multifd-compression", "multifd-zstd-level", "x-max-rounds", "x-converge-timeout", "x-postcopy-after-rounds",
        "x-switchover-timeout",
    ]

    /// `query-migrate-parameters`. Durations in ms; 0 stands for "none"
    /// where the setting is optional (unlimited bandwidth, no round limit).
    var parameters: JSONValue {
        [
            "multifd-channels": .int(Int64(channels)),
            "downtime-limit": .int(Int64((downtimeLimit * 1000).rounded())),
            "max-bandwidth": .int(Int64(maxBandwidth ?? 0)),
            "cpu-throttle-initial": .int(Int64(throttleInitial)),
            "cpu-throttle-increment": .int(Int64(throttleIncrement)),
            "multifd-compression": .string(compressionMethod == .none ? "none" : "zstd"),
            "multifd-zstd-level": .int(Int64(zstdLevel)),
            "x-max-rounds": .int(Int64(maxRounds ?? 0)),
            "x-converge-timeout": .int(Int64(((convergeTimeout ?? 0) * 1000).rounded())),
            "x-postcopy-after-rounds": .int(postcopyAfterRounds.map { Int64($0) } ?? -1),
            "x-switchover-timeout": .int(Int64(((switchoverTimeout ?? 0) * 1000).rounded())),
        ]
    }

    /// `migrate-set-parameters`: all or nothing.
    func settingParameters(_ a: QMPArguments) throws(QMPError) -> SourceSettings {
        // The arguments' types first (QMP's own errors), then the values
        // with the checks the command line uses.
        let channels = try a.optionalInt("multifd-channels"), downtime = try a.optionalInt("downtime-limit")
        let bandwidth = try a.optionalInt("max-bandwidth"), initial = try a.optionalInt("cpu-throttle-initial")
        let increment = try a.optionalInt("cpu-throttle-increment"), method = try a.optionalString("multifd-compression")
        let level = try a.optionalInt("multifd-zstd-level"), rounds = try a.optionalInt("x-max-rounds")
        let timeout = try a.optionalInt("x-converge-timeout"), afterRounds = try a.optionalInt("x-postcopy-after-rounds")
        let switchover = try a.optionalInt("x-switchover-timeout")
        var s = self
        do throws(SettingError) {
            if let n = channels { s.channels = try SettingCheck.channels(n, "multifd-channels") }
            if let n = downtime {
                s.downtimeLimit = try SettingCheck.milliseconds(n, "downtime-limit", max: SettingCheck.maxDowntimeMilliseconds)
            }
            if let n = bandwidth { s.maxBandwidth = try SettingCheck.bandwidth(n, "max-bandwidth") }
            if let n = initial { s.throttleInitial = try SettingCheck.throttlePercent(n, "cpu-throttle-initial") }
            if let n = increment { s.throttleIncrement = try SettingCheck.throttlePercent(n, "cpu-throttle-increment") }
            if let m = method { s.compressionMethod = try SettingCheck.compressionMethod(m, "multifd-compression") }
            if let n = level { s.zstdLevel = try SettingCheck.zstdLevel(n, "multifd-zstd-level") }
            if let n = rounds { s.maxRounds = n == 0 ? nil : try SettingCheck.maxRounds(n, "x-max-rounds") }
            if let n = timeout {
                let t = try SettingCheck.milliseconds(n, "x-converge-timeout")
                s.convergeTimeout = t == 0 ? nil : t
            }
            if let n = afterRounds {
                // -1: no switch until migrate-start-postcopy.
                s.postcopyAfterRounds = n == -1 ? nil : try SettingCheck.postcopyAfterRounds(n, "x-postcopy-after-rounds")
            }
            if let n = switchover {
                let t = try SettingCheck.milliseconds(n, "x-switchover-timeout")
                s.switchoverTimeout = t == 0 ? nil : t
            }
        } catch {
            throw QMPError(error.description)
        }
        return s
    }
}

extension DestinationSettings {
    static let capabilityNames = ["multifd", "events"]

    var capabilities: [(String, Bool)] { [("multifd", true), ("events", events)] }

    func settingCapabilities(_ list: [(String, Bool)]) throws(SettingError) -> DestinationSettings {
        var s = self
        for (name, state) in list {
            switch name {
            case "multifd":
                guard state else { throw SettingError("multifd cannot be turned off: livemig always migrates over multifd channels") }
            case "events": s.events = state
            case "postcopy-ram", "postcopy-preempt", "auto-converge", "zero-copy-send":
                // The destination follows what the source's hello announces.
                if state {
                    throw SettingError("\(name) is the source's choice: set it on the source; the destination follows its hello")
                }
            default: try refuseUnknownCapability(name, state: state, known: Self.capabilityNames)
            }
        }
        return s
    }

    var parameters: JSONValue { ["multifd-channels": .int(Int64(channels))] }

    /// The destination takes `multifd-channels`; the source's parameters
    /// are refused with a pointer to the source.
    func settingParameters(_ a: QMPArguments) throws(QMPError) -> DestinationSettings {
        var s = self
        for key in a.values.keys.sorted() where key != "multifd-channels" {
            throw QMPError("\(key) is a source setting: set it on the source (the destination takes multifd-channels)")
        }
        if let n = try a.optionalInt("multifd-channels") {
            do throws(SettingError) {
                s.channels = try SettingCheck.channels(n, "multifd-channels")
            } catch {
                throw QMPError(error.description)
            }
        }
        return s
    }
}

private func refuseUnknownCapability(_ name: String, state: Bool, known: [String]) throws(SettingError) {
    guard qemuCapabilities.contains(name) else {
        throw SettingError("Parameter 'capability' does not accept value '\(name)'; this side knows \(known.joined(separator: ", "))")
    }
    if state { throw SettingError("capability \(name) is not supported by livemig (it supports \(known.joined(separator: ", ")))") }
}
