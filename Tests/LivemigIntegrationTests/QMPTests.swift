import Foundation
import Testing
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// `send --qmp` and `receive --qmp` driven as two QEMUs are: by the
/// `qemu.qmp` Python library (tools/qmp-migrate.py, installed by
/// tools/install-deps.sh), and by a plain socket for the error cases.
@Suite("QMP-driven migration", .serialized)
struct QMPDrivenTests {
    static let size = "32MiB"
    static let bytes: Int64 = 32 << 20
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("tools/qmp-migrate.py").path

    /// A stress guest, a `send --qmp` and a `receive --qmp`.
    final class Rig {
        let scratch: Scratch
        let src, srcCtl, dst, dstCtl: String
        let sourceQMP, destinationQMP: String
        let guest: LivemigProcess
        let source: LivemigProcess
        let destination: LivemigProcess

        let incoming: LivemigProcess?

        /// `sourceQMP`: the source's QMP address (default a Unix socket).
        /// `incomingGuest`: the destination has an incoming guest (postcopy;
        /// the RAM files are then on tmpfs).
        /// `--ram` of the source and of the destination.
        let sourceRAM: [String], destinationRAM: [String]

        /// `blocks`: a guest of several RAM blocks (`--ram NAME=PATH`),
        /// name and size each.
        init(rate: String, sourceQMP: String? = nil, incomingGuest: Bool = false, blocks: [(String, String)] = []) throws {
            scratch = try incomingGuest ? Scratch(under: "/dev/shm/") : Scratch()
            src = scratch.path("src.ram")
            srcCtl = scratch.path("src.ctl")
            dst = scratch.path("dst.ram")
            dstCtl = scratch.path("dst.ctl")
            self.sourceQMP = sourceQMP ?? "unix:" + scratch.path("src.qmp")
            destinationQMP = "unix:" + scratch.path("dst.qmp")
            let (srcBase, dstBase) = (src, dst)
            if blocks.isEmpty {
                sourceRAM = ["--ram", srcBase]
                destinationRAM = ["--ram", dstBase]
            } else {
                sourceRAM = blocks.flatMap { ["--ram", "\($0.0)=\(srcBase)-\($0.0)"] }
                destinationRAM = blocks.flatMap { ["--ram", "\($0.0)=\(dstBase)-\($0.0)"] }
            }
            let guestRAM =
                blocks.isEmpty
                ? ["--ram", srcBase, "--size", QMPDrivenTests.size]
                : blocks.flatMap { ["--ram", "\($0.0)=\(srcBase)-\($0.0),size=\($0.1)"] }
            guest = try LivemigProcess(
                ["stress"] + guestRAM + ["--control", srcCtl, "--pattern", "counter", "--threads", "2", "--rate", rate])
            #expect(guest.waitForStderr("guest started"), "the guest did not start")
            if incomingGuest {
                let g = try LivemigProcess([
                    "stress", "--incoming", "--ram", dst, "--control", dstCtl, "--size", QMPDrivenTests.size, "--duration", "2s",
                ])
                #expect(g.waitForStderr("incoming guest waiting"), "the incoming guest did not start")
                incoming = g
            } else {
                incoming = nil
            }
            source = try LivemigProcess(["send"] + sourceRAM + ["--guest", srcCtl, "--qmp", self.sourceQMP])
            destination = try LivemigProcess(["receive"] + destinationRAM + ["--guest", dstCtl, "--qmp", destinationQMP])
            #expect(source.waitForStderr("QMP listening"), "send --qmp did not start")
            #expect(destination.waitForStderr("QMP listening"), "receive --qmp did not start")
        }

        /// Runs tools/qmp-migrate.py; its JSON report, after checking it succeeded.
        func drive(_ scenario: String, uri: String) throws -> [String: Any] {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["python3", QMPDrivenTests.script, scenario, sourceQMP, destinationQMP, uri]
            let out = Pipe(), err = Pipe()
            p.standardOutput = out
            p.standardError = err
            try p.run()
            let stdout = out.fileHandleForReading.readDataToEndOfFile()
            let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            try #require(
                p.terminationStatus == 0,
                "qmp-migrate.py \(scenario) failed (\(p.terminationStatus)); is qemu.qmp installed (tools/install-deps.sh)? \(stderr)")
            return try #require(try JSONSerialization.jsonObject(with: stdout) as? [String: Any])
        }

        /// Stops a guest still running here (SIGINT: it saves its state).
        func stopGuest() -> Int32 {
            if guest.process.isRunning { kill(guest.pid, SIGINT) }
            return guest.wait(timeout: 20).status
        }

        deinit {
            for p in [source, destination, guest] + (incoming.map { [$0] } ?? []) where p.process.isRunning { kill(p.pid, SIGKILL) }
        }
    }

    /// The MIGRATION statuses and MIGRATION_PASS numbers, in order.
    static func events(_ log: Any?) -> (statuses: [String], passes: [Int]) {
        var statuses: [String] = [], passes: [Int] = []
        for e in (log as? [[String: Any]]) ?? [] {
            let data = e["data"] as? [String: Any] ?? [:]
            if e["event"] as? String == "MIGRATION", let s = data["status"] as? String { statuses.append(s) }
            if e["event"] as? String == "MIGRATION_PASS", let n = data["pass"] as? Int { passes.append(n) }
        }
        return (statuses, passes)
    }

    static func verify(_ ram: String, _ ctl: String) throws -> (status: Int32, stdout: String, stderr: String, seconds: Double) {
        try livemig(["verify", "--ram", ram, "--control", ctl])
    }

    @Test("a whole live migration over QMP: capabilities, parameters, migrate-incoming, migrate, events, query-migrate")
    func completeMigration() throws {
        // The source's QMP on loopback TCP, the destination's on a Unix socket.
        let rig = try Rig(rate: "64MiB/s", sourceQMP: "tcp:127.0.0.1:\(freePort())")
        let report = try rig.drive("complete", uri: "tcp:127.0.0.1:\(freePort())")
        let greeting = (report["greeting"] as? [String: Any])?["QMP"] as? [String: Any]
        #expect((greeting?["version"] as? [String: Any])?["package"] as? String == "livemig")
        let run = try #require(report["complete"] as? [String: Any])
        let (srcStatuses, passes) = Self.events(run["source-events"])
        #expect(srcStatuses == ["setup", "active", "completed"], "source MIGRATION events: \(srcStatuses)")
        #expect(!passes.isEmpty && passes == Array(1...passes.count), "MIGRATION_PASS events: \(passes)")
        #expect(Self.events(run["destination-events"]).statuses == ["setup", "active", "completed"])
        let info = try #require(run["source-info"] as? [String: Any])
        let ram = try #require(info["ram"] as? [String: Any])
        #expect(info["status"] as? String == "completed")
        #expect(ram["total"] as? Int64 == Self.bytes)
        #expect((ram["dirty-sync-count"] as? Int ?? 0) >= passes.count)
        // Every page went at least once (zero pages as offsets only, so the
        // bytes on the wire say little).
        let pagesSent = (ram["normal"] as? Int64 ?? 0) + (ram["duplicate"] as? Int64 ?? 0)
        #expect(pagesSent >= Self.bytes / 4096 && (ram["transferred"] as? Int64 ?? 0) > 0, "\(ram)")
        #expect(ram["page-size"] as? Int == 4096)
        #expect(info["downtime"] != nil && info["total-time"] != nil && info["setup-time"] != nil)
        let dinfo = try #require(run["destination-info"] as? [String: Any])
        #expect(dinfo["status"] as? String == "completed")
        #expect((dinfo["ram"] as? [String: Any])?["total"] as? Int64 == Self.bytes)
        // The script quit both: the last migration completed, so 0.
        let s = rig.source.wait(timeout: 30), d = rig.destination.wait(timeout: 30)
        #expect(s.status == 0, "\(s.stderr)")
        #expect(d.status == 0, "\(d.stderr)")
        let g = rig.guest.wait(timeout: 20)
        #expect(g.status == 0 && g.stdout.contains("migrated"), "\(g.stdout) \(g.stderr)")
        let v = try Self.verify(rig.dst, rig.dstCtl)
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("a guest of two RAM blocks migrates over QMP; query-migrate counts both")
    func twoBlocks() throws {
        let rig = try Rig(rate: "32MiB/s", blocks: [("pc.ram", "16MiB"), ("vga.vram", "4MiB")])
        let report = try rig.drive("complete", uri: "unix:" + rig.scratch.path("mig.sock"))
        let run = try #require(report["complete"] as? [String: Any])
        let info = try #require(run["source-info"] as? [String: Any])
        #expect((info["ram"] as? [String: Any])?["total"] as? Int64 == 20 << 20, "\(info)")
        #expect(rig.source.wait(timeout: 30).status == 0)
        #expect(rig.destination.wait(timeout: 30).status == 0)
        #expect(rig.guest.wait(timeout: 20).status == 0)
        let v = try livemig(["verify"] + rig.destinationRAM + ["--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("migrate_cancel after the first pass: the source guest runs on and verifies")
    func cancelHalfway() throws {
        // 16 MiB/s (set by the script) against a guest dirtying 32 MiB/s: the
        // migration cannot converge, so it is still running at the cancel.
        let rig = try Rig(rate: "32MiB/s")
        let report = try rig.drive("cancel", uri: "unix:" + rig.scratch.path("mig.sock"))
        let run = try #require(report["cancel"] as? [String: Any])
        let (statuses, passes) = Self.events(run["source-events"])
        #expect(statuses == ["setup", "active", "cancelling", "cancelled"], "\(statuses)")
        #expect(passes.first == 1)
        let during = try #require(run["during"] as? [String: Any])
        #expect(during["status"] as? String == "active")
        #expect(((during["ram"] as? [String: Any])?["remaining"] as? Int64 ?? 0) > 0)
        let info = try #require(run["source-info"] as? [String: Any])
        #expect(info["status"] as? String == "cancelled")
        #expect((info["error-desc"] as? String)?.contains("migrate_cancel") == true)
        let dstEnd = Self.events(run["destination-events"]).statuses.last
        #expect(dstEnd == "failed" || dstEnd == "cancelled")
        // query-status reads the guest's run state from its control file.
        let status = run["source-status"] as? [String: Any] ?? [:]
        #expect(status["status"] as? String == "running" && status["running"] as? Bool == true, "\(status)")
        // The last migration did not complete: both exit 1 after quit.
        #expect(rig.source.wait(timeout: 30).status == 1)
        #expect(rig.destination.wait(timeout: 30).status == 1)
        #expect(kill(rig.guest.pid, 0) == 0, "the source guest should still run")
        #expect(rig.stopGuest() == 0)
        let v = try Self.verify(rig.src, rig.srcCtl)
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("postcopy over QMP: postcopy-ram, migrate-start-postcopy after the first pass, postcopy-active, completed")
    func postcopyOverQMP() throws {
        let rig = try Rig(rate: "unlimited", incomingGuest: true)
        let report = try rig.drive("postcopy", uri: "tcp:127.0.0.1:\(freePort())")
        let run = try #require(report["postcopy"] as? [String: Any])
        let statuses = Self.events(run["source-events"]).statuses
        #expect(statuses == ["setup", "active", "postcopy-active", "completed"], "\(statuses)")
        let info = try #require(run["source-info"] as? [String: Any])
        #expect(info["status"] as? String == "completed")
        #expect(info["postcopy"] != nil, "\(info)")
        #expect(rig.source.wait(timeout: 30).status == 0)
        #expect(rig.destination.wait(timeout: 30).status == 0)
        #expect(rig.guest.wait(timeout: 20).status == 0)
        let dg = try #require(rig.incoming).wait(timeout: 30)
        #expect(dg.status == 0, "\(dg.stdout) \(dg.stderr)")
        let v = try Self.verify(rig.dst, rig.dstCtl)
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("after a cancelled migration the same two processes migrate again")
    func migrateAgainAfterCancel() throws {
        let rig = try Rig(rate: "32MiB/s")
        let report = try rig.drive("retry", uri: "unix:" + rig.scratch.path("mig.sock"))
        let again = try #require(report["complete"] as? [String: Any])
        #expect(Self.events(again["source-events"]).statuses == ["setup", "active", "completed"])
        #expect(rig.source.wait(timeout: 30).status == 0)
        #expect(rig.destination.wait(timeout: 30).status == 0)
        #expect(rig.guest.wait(timeout: 20).status == 0)
        let v = try Self.verify(rig.dst, rig.dstCtl)
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }
}

/// The errors a QMP client gets from `livemig send --qmp`, over a plain
/// socket: QEMU's classes, and the command line's words for settings.
@Suite("QMP errors", .serialized)
struct QMPErrorTests {
    /// One request, one reply (events are off).
    final class Client {
        let socket: Socket
        private var pending: [UInt8] = []

        init(_ address: String) throws {
            socket = try Socket.connect(to: try SocketAddress(parsing: address), timeout: 5)
            socket.setReceiveTimeout(30)
            _ = try line()  // the greeting
            #expect(try execute(#"{"execute":"qmp_capabilities"}"#)["return"] != nil)
        }

        func line() throws -> [String: Any] {
            while true {
                if let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    let bytes = Data(pending[..<nl])
                    pending.removeSubrange(...nl)
                    return try #require(try JSONSerialization.jsonObject(with: bytes) as? [String: Any])
                }
                var buf = [UInt8](repeating: 0, count: 4096)
                let n = recv(socket.fd, &buf, buf.count, 0)
                guard n > 0 else { throw SocketError(.peerClosed, "livemig closed the QMP connection") }
                pending += buf[0..<n]
            }
        }

        func execute(_ request: String) throws -> [String: Any] {
            try socket.sendAll(Array(request.utf8))
            while true {
                let m = try line()
                if m["event"] == nil { return m }
            }
        }

        /// The error's class and description.
        func error(_ request: String) throws -> (String, String) {
            let e = try execute(request)["error"] as? [String: Any] ?? [:]
            return (e["class"] as? String ?? "no error", e["desc"] as? String ?? "")
        }
    }

    @Test("bad commands and settings get GenericError or CommandNotFound, with the command line's wording")
    func errors() throws {
        let scratch = try Scratch()
        let ram = scratch.path("src.ram")
        try writeFilled(ram, bytes: 1 << 20, value: 7)
        let qmp = "unix:" + scratch.path("q.sock")
        let source = try LivemigProcess(["send", "--ram", ram, "--qmp", qmp])
        try #require(source.waitForStderr("QMP listening"))
        let c = try Client(qmp)
        #expect(try c.error(#"{"execute":"no-such-command"}"#) == ("CommandNotFound", "The command no-such-command has not been found"))
        #expect(try c.execute(#"{"execute":"query-migrate"}"#)["return"] as? [String: AnyHashable] == [:])
        #expect(try c.error(#"{"execute":"migrate"}"#) == ("GenericError", "Parameter 'uri' is missing"))
        #expect(try c.error(#"{"execute":"migrate","arguments":{"uri":"exec:cat"}}"#).1.contains("must start with 'tcp:' or 'unix:'"))
        #expect(try c.error(#"{"execute":"migrate","arguments":{"uri":"unix:/x","resume":true}}"#).1.contains("recovers"))
        // The same check, the same words as --throttle-initial.
        let (cls, desc) = try c.error(#"{"execute":"migrate-set-parameters","arguments":{"cpu-throttle-initial":120}}"#)
        #expect(cls == "GenericError")
        #expect(desc == "cpu-throttle-initial must be from 1 to 99 (percent), got 120")
        let cli = try livemig(["send", "--ram", ram, "--to", "unix:/x", "--throttle-initial", "120"])
        #expect(cli.status == 2 && cli.stderr.contains("--throttle-initial must be from 1 to 99 (percent), got 120"), "\(cli.stderr)")
        #expect(
            try c.error(#"{"execute":"migrate-set-parameters","arguments":{"multifd-channels":65}}"#).1
                == "multifd-channels must be from 1 to 64, got 65")
        #expect(
            try c.error(#"{"execute":"migrate-set-parameters","arguments":{"multifd-compression":"zlib"}}"#).1.contains("use none or zstd"))
        #expect(try c.error(#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":"1s"}}"#).1.contains("expected: integer"))
        #expect(
            try c.error(#"{"execute":"migrate-set-parameters","arguments":{"announce-step":1}}"#).1
                == "Parameter 'announce-step' is unexpected")
        // A failed set changes nothing: the set is all or nothing.
        #expect(
            try c.error(#"{"execute":"migrate-set-parameters","arguments":{"multifd-channels":4,"cpu-throttle-increment":0}}"#).0
                == "GenericError")
        let params = try c.execute(#"{"execute":"query-migrate-parameters"}"#)["return"] as? [String: Any] ?? [:]
        #expect(params["multifd-channels"] as? Int == 2)
        #expect(try c.execute(#"{"execute":"migrate-set-parameters","arguments":{"multifd-channels":4}}"#)["return"] != nil)
        let after = try c.execute(#"{"execute":"query-migrate-parameters"}"#)["return"] as? [String: Any] ?? [:]
        #expect(after["multifd-channels"] as? Int == 4)
        // Capabilities: multifd stays on; auto-converge needs a guest.
        #expect(
            try c.error(#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"multifd","state":false}]}}"#).1
                .contains("multifd cannot be turned off"))
        #expect(
            try c.error(#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle","state":true}]}}"#).1
                .contains("not supported"))
        #expect(
            try c.execute(#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"xbzrle","state":false}]}}"#)[
                "return"] != nil)
        #expect(
            try c.error(
                #"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":true}]}}"#
            ).1
                .contains("apply to live migration"))
        // Zero copy needs TCP: refused for a Unix destination at migrate.
        #expect(
            try c.execute(
                #"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"zero-copy-send","state":true}]}}"#)[
                    "return"] != nil)
        #expect(try c.error(#"{"execute":"migrate","arguments":{"uri":"unix:/nowhere"}}"#).1.contains("needs a TCP destination"))
        #expect(try c.error(#"{"execute":"migrate-start-postcopy"}"#).1.contains("after migration has been started"))
        // Malformed input is answered, and the connection goes on.
        #expect(try c.error("{\"execute\": }").0 == "GenericError")
        // A second process on the same QMP path is refused while this one lives.
        let second = try livemig(["send", "--ram", ram, "--qmp", qmp])
        #expect(second.status == 1 && second.stderr.contains("another program is accepting there"), "\(second.stderr)")
        #expect(try c.execute(#"{"execute":"quit"}"#)["return"] != nil)
        let end = source.wait(timeout: 30)
        #expect(end.status == 0, "no migration ran: \(end.stderr)")
        #expect(access(scratch.path("q.sock"), F_OK) != 0, "the QMP socket file is removed at exit")
    }

    @Test("a migration of a RAM file alone through QMP, then calc-dirty-rate")
    func ramFileAndDirtyRate() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 1024, seed: 16) { $0 % 3 == 0 }
        let sq = "unix:" + scratch.path("s.qmp"), dq = "unix:" + scratch.path("d.qmp"), uri = "unix:" + scratch.path("m.sock")
        let source = try LivemigProcess(["send", "--ram", src, "--qmp", sq])
        let destination = try LivemigProcess(["receive", "--ram", dst, "--qmp", dq])
        try #require(source.waitForStderr("QMP listening") && destination.waitForStderr("QMP listening"))
        let s = try Client(sq), d = try Client(dq)
        let before = try d.execute(#"{"execute":"query-status"}"#)["return"] as? [String: Any] ?? [:]
        #expect(before["status"] as? String == "inmigrate" && before["running"] as? Bool == false, "\(before)")
        // The destination takes multifd-channels only; the rest is the source's.
        #expect(try d.error(#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":100}}"#).1.contains("source setting"))
        #expect(try d.error(#"{"execute":"migrate-recover","arguments":{"uri":"unix:/x"}}"#).1.contains("recovers by itself"))
        #expect(try d.execute(#"{"execute":"migrate-incoming","arguments":{"uri":"\#(uri)"}}"#)["return"] != nil)
        #expect(try d.error(#"{"execute":"migrate-incoming","arguments":{"uri":"\#(uri)"}}"#).1.contains("already been started"))
        #expect(try s.execute(#"{"execute":"migrate","arguments":{"uri":"\#(uri)"}}"#)["return"] != nil)
        // Without events: poll until the status is final.
        var status = ""
        for _ in 0..<6000 {
            let r = try s.execute(#"{"execute":"query-migrate"}"#)["return"] as? [String: Any] ?? [:]
            status = r["status"] as? String ?? ""
            if status == "completed" || status == "failed" { break }
            usleep(10_000)
        }
        #expect(status == "completed")
        for _ in 0..<6000 {
            let r = try d.execute(#"{"execute":"query-migrate"}"#)["return"] as? [String: Any] ?? [:]
            status = r["status"] as? String ?? ""
            if status == "completed" || status == "failed" { break }
            usleep(10_000)
        }
        #expect(status == "completed")
        #expect(try filesEqual(src, dst))
        #expect(try d.error(#"{"execute":"migrate-incoming","arguments":{"uri":"\#(uri)"}}"#).1.contains("has completed"))
        // calc-dirty-rate samples the RAM file; nothing writes it.
        #expect(
            try s.execute(#"{"execute":"calc-dirty-rate","arguments":{"calc-time":50,"calc-time-unit":"millisecond"}}"#)["return"] != nil)
        var rate: [String: Any] = [:]
        for _ in 0..<6000 {
            rate = try s.execute(#"{"execute":"query-dirty-rate"}"#)["return"] as? [String: Any] ?? [:]
            if rate["status"] as? String == "measured" { break }
            usleep(10_000)
        }
        #expect(rate["status"] as? String == "measured")
        #expect(rate["dirty-rate"] as? Int == 0)
        #expect(rate["mode"] as? String == "page-sampling")
        #expect(try s.error(#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"mode":"dirty-bitmap"}}"#).1.contains("--guest"))
        _ = try s.execute(#"{"execute":"quit"}"#)
        _ = try d.execute(#"{"execute":"quit"}"#)
        #expect(source.wait(timeout: 30).status == 0)
        #expect(destination.wait(timeout: 30).status == 0)
    }

    @Test("receive --qmp: migrate_cancel of a waiting migrate-incoming, the address bound again, SIGTERM cancels and quits")
    func destinationCancelAndSignal() throws {
        let scratch = try Scratch()
        let dq = "unix:" + scratch.path("d.qmp"), uri = "tcp:127.0.0.1:\(freePort())"
        let destination = try LivemigProcess(["receive", "--ram", scratch.path("dst.ram"), "--size", "1MiB", "--qmp", dq])
        try #require(destination.waitForStderr("QMP listening"))
        let d = try Client(dq)
        #expect(try d.execute(#"{"execute":"migrate-incoming","arguments":{"uri":"\#(uri)"}}"#)["return"] != nil)
        #expect(
            try d.error(#"{"execute":"migrate-set-parameters","arguments":{"multifd-channels":3}}"#).1.contains(
                "while a migration is running"))
        #expect(try d.execute(#"{"execute":"migrate_cancel"}"#)["return"] != nil)
        var status = ""
        for _ in 0..<6000 {
            status = (try d.execute(#"{"execute":"query-migrate"}"#)["return"] as? [String: Any])?["status"] as? String ?? ""
            if status == "cancelled" || status == "failed" { break }
            usleep(10_000)
        }
        #expect(status == "cancelled")
        // The cancelled run let go of the port: the same address again.
        #expect(try d.execute(#"{"execute":"migrate-incoming","arguments":{"uri":"\#(uri)"}}"#)["return"] != nil)
        kill(destination.pid, SIGTERM)
        let end = destination.wait(timeout: 30)
        #expect(end.status == 1, "a cancelled incoming migration is not a success: \(end.stderr)")
        #expect(end.stderr.contains("SIGTERM"), "\(end.stderr)")
        #expect(access(scratch.path("d.qmp"), F_OK) != 0, "the QMP socket file is removed at exit")
        #expect(access(scratch.path("dst.ram"), F_OK) != 0, "a RAM file the failed receive created is removed")
    }
}
