import Foundation
import GuestMemory
import SystemPackage
import TestSupport
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("GuestControl")
struct GuestControlTests {
    static let MiB: UInt64 = 1 << 20
    static let block = RAMBlock(size: 1 << 20, pageSize: 4096)

    /// Runs `body` with the path of a control file (not yet created) in a
    /// fresh directory that is removed afterwards.
    static func withControlPath(_ body: (FilePath, URL) throws -> Void) throws {
        try RAMFileTests.withTempDir { dir in
            let url = dir.appendingPathComponent("control")
            try body(FilePath(url.path), url)
        }
    }

    static func bytes(_ url: URL, _ range: Range<Int>) throws -> [UInt8] {
        Array(try Data(contentsOf: url)[range])
    }

    static func generation(_ url: URL) throws -> UInt32 {
        try bytes(url, 100..<104).withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }
    }

    // MARK: - create and open

    @Test func headerRoundTrips() throws {
        try Self.withControlPath { path, url in
            do {
                let c = try GuestControl.create(path: path, for: Self.block)
                #expect(c.ramSize == Self.MiB)
                #expect(c.pageSize == 4096)
                #expect(c.path == path)
            }
            let again = try GuestControl(path: path)
            #expect(again.ramSize == Self.MiB)
            #expect(again.pageSize == 4096)
            #expect(again.bitmap.pageCount == 256)
            #expect(again.bitmap.wordCount == 4)
            #expect(again.bitmap.dirtyCount() == 0)
            #expect(again.runState == .running)
            #expect(again.stateLength == 0)
            #expect(again.readState().isEmpty)
            // On disk: the magic, and the documented size.
            #expect(try Self.bytes(url, 0..<8) == Array("LMGUEST1".utf8))
            let size = try RAMFileTests.fileSize(url)
            #expect(size == UInt64(GuestControl.fileSize(ramSize: Self.MiB, pageSize: 4096)))
            #expect(size == 4096 + 4096 + UInt64(GuestControl.stateCapacity))
        }
    }

    @Test func geometryOfALargerBlock() throws {
        try Self.withControlPath { path, _ in
            // 4 MiB + 1 page: 1025 pages, 17 words.
            let block = RAMBlock(size: 4 * Self.MiB + 4096, pageSize: 4096)
            _ = try GuestControl.create(path: path, for: block)
            let c = try GuestControl.openOrCreate(path: path, for: block)
            #expect(c.ramSize == 4 * Self.MiB + 4096)
            #expect(c.bitmap.pageCount == 1025)
            #expect(c.bitmap.wordCount == 17)
        }
    }

    @Test func openOrCreateCreatesThenReopens() throws {
        try Self.withControlPath { path, _ in
            do {
                let c = try GuestControl.openOrCreate(path: path, for: Self.block)
                try c.writeState([1, 2, 3])
                c.bitmap.mark(page: 9)
            }
            let again = try GuestControl.openOrCreate(path: path, for: Self.block)
            #expect(again.readState() == [1, 2, 3])
            #expect(again.bitmap.isDirty(page: 9))
            #expect(again.bitmap.dirtyCount() == 1)
        }
    }

    @Test func openOrCreateRejectsAnotherRAMSize() throws {
        try Self.withControlPath { path, _ in
            _ = try GuestControl.create(path: path, for: Self.block)
            let error = #expect(throws: GuestMemoryError.self) {
                try GuestControl.openOrCreate(path: path, for: RAMBlock(size: 2 * Self.MiB, pageSize: 4096))
            }
            #expect(error?.description.contains("1048576") == true, "\(String(describing: error))")
            #expect(error?.description.contains("2097152") == true, "\(String(describing: error))")
            #expect(error?.description.contains(path.string) == true, "\(String(describing: error))")
        }
    }

    @Test func openOrCreateRejectsAnotherPageSize() throws {
        try Self.withControlPath { path, _ in
            _ = try GuestControl.create(path: path, for: Self.block)
            let error = #expect(throws: GuestMemoryError.self) {
                try GuestControl.openOrCreate(path: path, for: RAMBlock(size: Self.MiB, pageSize: 8192))
            }
            #expect(error?.description.contains("4096-byte pages") == true, "\(String(describing: error))")
            #expect(error?.description.contains("8192-byte pages") == true, "\(String(describing: error))")
        }
    }

    @Test func createRefusesAnExistingFile() throws {
        try Self.withControlPath { path, _ in
            _ = try GuestControl.create(path: path, for: Self.block)
            let error = #expect(throws: GuestMemoryError.self) { try GuestControl.create(path: path, for: Self.block) }
            #expect(error?.errno == .fileExists, "\(String(describing: error))")
        }
    }

    @Test func randomBytesAreNotAControlFile() throws {
        try Self.withControlPath { path, url in
            var rng = SplitMix64(seed: 42)
            var bytes = (0..<8192).map { _ in UInt8.random(in: 0...255, using: &rng) }
            // Keep the header's word count and state offset (u64 at 40 and
            // 48) under Int.max: larger values trap in GuestControl.init
            // (see garbageHeaderWordsDoNotCrash).
            bytes[47] &= 0x7F
            bytes[55] &= 0x7F
            try Data(bytes).write(to: url)
            let error = #expect(throws: GuestMemoryError.self) { try GuestControl(path: path) }
            #expect(error?.description.contains("not a livemig control file") == true, "\(String(describing: error))")
            #expect(error?.description.contains(path.string) == true, "\(String(describing: error))")
            // openOrCreate does not overwrite it either.
            #expect(throws: GuestMemoryError.self) { try GuestControl.openOrCreate(path: path, for: Self.block) }
            #expect(try RAMFileTests.fileSize(url) == 8192)
        }
    }

    @Test("a header with a word count over Int.max is rejected, not a crash")
    func garbageHeaderWordsDoNotCrash() async {
        await #expect(processExitsWith: .success) {
            // The file is unlinked at once and reached through /proc, so a
            // crash leaves nothing behind.
            let url = FileManager.default.temporaryDirectory.appendingPathComponent("livemig-exit-\(UUID().uuidString)")
            var bytes = [UInt8](repeating: 0x11, count: 8192)
            bytes[47] = 0xFF  // the u64 at 40 (bitmap words) is now > Int.max
            try? Data(bytes).write(to: url)
            let fd = open(url.path, O_RDWR)
            try? FileManager.default.removeItem(at: url)
            guard fd >= 0 else { exit(4) }
            do {
                _ = try GuestControl(path: FilePath("/proc/self/fd/\(fd)"))
                exit(2)  // accepted garbage
            } catch {
                exit("\(error)".contains("not a livemig control file") ? 0 : 3)
            }
        }
    }

    @Test func aTruncatedControlFileIsRejected() throws {
        try Self.withControlPath { path, url in
            _ = try GuestControl.create(path: path, for: Self.block)
            // A valid header, but the bitmap and state area are cut off.
            let handle = try FileHandle(forWritingTo: url)
            try handle.truncate(atOffset: 8192)
            try handle.close()
            let error = #expect(throws: GuestMemoryError.self) { try GuestControl(path: path) }
            #expect(error?.description.contains("not a livemig control file") == true, "\(String(describing: error))")
        }
    }

    @Test func tinyAndMissingFilesAreRejected() throws {
        try Self.withControlPath { path, url in
            let missing = #expect(throws: GuestMemoryError.self) { try GuestControl(path: path) }
            #expect(missing?.description.contains("does not exist") == true, "\(String(describing: missing))")
            #expect(missing?.errno == .noSuchFileOrDirectory)
            try Data(repeating: 0, count: 100).write(to: url)
            let tiny = #expect(throws: GuestMemoryError.self) { try GuestControl(path: path) }
            #expect(tiny?.description.contains("100 bytes") == true, "\(String(describing: tiny))")
        }
    }

    // MARK: - guest state

    @Test func stateRoundTrips() throws {
        try Self.withControlPath { path, _ in
            let c = try GuestControl.create(path: path, for: Self.block)
            let state = (0..<1000).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
            try c.writeState(state)
            #expect(c.stateLength == 1000)
            #expect(c.readState() == state)
            // Another opener sees it.
            #expect(try GuestControl(path: path).readState() == state)
            // A shorter state replaces it.
            try c.writeState([9, 8])
            #expect(c.readState() == [9, 8])
            // The full capacity fits.
            let full = [UInt8](repeating: 0xA5, count: GuestControl.stateCapacity)
            try c.writeState(full)
            #expect(c.readState() == full)
        }
    }

    @Test func oversizeStateThrowsAndKeepsTheOldOne() throws {
        try Self.withControlPath { path, _ in
            let c = try GuestControl.create(path: path, for: Self.block)
            try c.writeState([1, 2, 3])
            let error = #expect(throws: GuestMemoryError.self) {
                try c.writeState([UInt8](repeating: 0, count: GuestControl.stateCapacity + 1))
            }
            #expect(error?.description.contains("\(GuestControl.stateCapacity + 1) bytes") == true, "\(String(describing: error))")
            #expect(error?.description.contains("\(GuestControl.stateCapacity)") == true, "\(String(describing: error))")
            #expect(c.readState() == [1, 2, 3])
        }
    }

    @Test func bitmapMarksDoNotTouchTheState() throws {
        try Self.withControlPath { path, _ in
            let c = try GuestControl.create(path: path, for: RAMBlock(size: 4 * Self.MiB, pageSize: 4096))
            let state = [UInt8](repeating: 0x3C, count: 512)
            try c.writeState(state)
            c.bitmap.markAll()
            #expect(c.bitmap.dirtyCount() == 1024)
            #expect(c.readState() == state)
            #expect(c.runState == .running)
            #expect(c.throttlePercent == 0)
        }
    }

    // MARK: - run control

    @Test func runStateSetAndExchange() throws {
        try Self.withControlPath { path, url in
            let a = try GuestControl.create(path: path, for: Self.block)
            let b = try GuestControl(path: path)
            #expect(a.runState == .running)
            let g0 = try Self.generation(url)
            a.setRunState(.pauseRequested)
            #expect(b.runState == .pauseRequested)
            let g1 = try Self.generation(url)
            #expect(g1 == g0 &+ 1)
            // From the wrong state: no change, no generation bump.
            #expect(!b.exchangeRunState(from: .running, to: .migrated))
            #expect(a.runState == .pauseRequested)
            #expect(try Self.generation(url) == g1)
            // From the right one.
            #expect(b.exchangeRunState(from: .pauseRequested, to: .running))
            #expect(a.runState == .running)
            #expect(try Self.generation(url) == g1 &+ 1)
            #expect(!a.exchangeRunState(from: .pauseRequested, to: .running))
            for s in [GuestControl.RunState.migrated, .incoming, .running] {
                a.setRunState(s)
                #expect(b.runState == s)
            }
        }
    }

    @Test func runStateDescriptions() {
        #expect(GuestControl.RunState.running.description == "running")
        #expect(GuestControl.RunState.pauseRequested.description == "pause requested")
        #expect(GuestControl.RunState.migrated.description == "migrated")
        #expect(GuestControl.RunState.incoming.description == "incoming")
        #expect(GuestControl.RunState.waitingIncoming.description == "waiting incoming")
        #expect(GuestControl.RunState.waitingIncoming.rawValue == 6)
    }

    @Test func waitingIncomingRoundTrips() throws {
        try Self.withControlPath { path, url in
            let a = try GuestControl.create(path: path, for: Self.block)
            let b = try GuestControl(path: path)
            a.setRunState(.waitingIncoming)
            #expect(b.runState == .waitingIncoming)
            #expect(try Self.bytes(url, 64..<68) == [6, 0, 0, 0])
            #expect(b.exchangeRunState(from: .waitingIncoming, to: .incoming))
            #expect(a.runState == .incoming)
        }
    }

    @Test func handoffSocketPathRoundTripsAtOffset128() throws {
        try Self.withControlPath { path, url in
            let a = try GuestControl.create(path: path, for: Self.block)
            let b = try GuestControl(path: path)
            #expect(b.handoffSocketPath == nil)
            let generation = try Self.generation(url)
            a.handoffSocketPath = "/dev/shm/vm.ctl.uffd"
            #expect(b.handoffSocketPath == "/dev/shm/vm.ctl.uffd")
            #expect(try Self.bytes(url, 128..<149) == Array("/dev/shm/vm.ctl.uffd".utf8) + [0])
            // A shorter path replaces the whole field: no tail of the old one.
            a.handoffSocketPath = "/s"
            #expect(b.handoffSocketPath == "/s")
            #expect(try Self.bytes(url, 128..<236).dropFirst(2).allSatisfy { $0 == 0 })
            // The longest that fits a sun_path, with its NUL in byte 107.
            let longest = "/" + String(repeating: "p", count: GuestControl.handoffSocketPathLimit - 1)
            a.handoffSocketPath = longest
            #expect(b.handoffSocketPath == longest)
            #expect(try Self.bytes(url, 235..<236) == [0])
            a.handoffSocketPath = nil
            #expect(b.handoffSocketPath == nil)
            // Nothing else in the header moved.
            #expect(try Self.generation(url) == generation)
            #expect(b.ramSize == Self.block.size)
            #expect(b.runState == .running)
        }
    }

    @Test func waitWhileWakesOnAChange() throws {
        try Self.withControlPath { path, _ in
            let c = try GuestControl.create(path: path, for: Self.block)
            // Not in that state: returns at once (a long timeout would hang the test).
            c.waitWhile(.pauseRequested, timeout: 60)
            let woke = DispatchSemaphore(value: 0)
            Thread.detachNewThread {
                c.waitWhile(.running, timeout: 60)
                woke.signal()
            }
            usleep(50_000)
            c.setRunState(.pauseRequested)
            #expect(woke.wait(timeout: .now() + 5) == .success, "waitWhile did not wake on the run-state change")
        }
    }

    @Test func pauseAcknowledgementsCount() throws {
        try Self.withControlPath { path, _ in
            let a = try GuestControl.create(path: path, for: Self.block)
            let b = try GuestControl(path: path)
            #expect(a.pausedThreads == 0)
            a.acknowledgePause()
            b.acknowledgePause()
            a.acknowledgePause()
            #expect(b.pausedThreads == 3)
            b.leavePause()
            #expect(a.pausedThreads == 2)
            a.leavePause()
            a.leavePause()
            #expect(b.pausedThreads == 0)

            a.guestThreads = 4
            #expect(b.guestThreads == 4)
            b.threadExited()
            #expect(a.guestThreads == 3)
        }
    }

    @Test func throttleAndPIDs() throws {
        try Self.withControlPath { path, _ in
            let a = try GuestControl.create(path: path, for: Self.block)
            let b = try GuestControl(path: path)
            a.throttlePercent = 40
            #expect(b.throttlePercent == 40)
            a.throttlePercent = 150
            #expect(b.throttlePercent == 99)
            a.guestPID = 1234
            a.sourcePID = getpid()
            #expect(b.guestPID == 1234)
            #expect(b.sourcePID == getpid())
        }
    }

    // MARK: - the pause lease

    @Test func leaseRenewalAndExpiry() throws {
        try Self.withControlPath { path, _ in
            let c = try GuestControl.create(path: path, for: Self.block)
            // A fresh file holds no lease.
            #expect(c.leaseDeadline == 0)
            #expect(c.pauseHolderVanished)

            c.sourcePID = getpid()
            let before = monotonicNanoseconds()
            c.renewLease()
            let after = monotonicNanoseconds()
            #expect(c.leaseDeadline >= before + 2_000_000_000)
            #expect(c.leaseDeadline <= after + 2_000_000_000)
            #expect(!c.pauseHolderVanished)
            #expect(!(try GuestControl(path: path)).pauseHolderVanished)

            c.leaseDeadline = 1
            #expect(c.pauseHolderVanished)

            // No source pid recorded: only the lease counts.
            c.sourcePID = 0
            c.renewLease()
            #expect(!c.pauseHolderVanished)
        }
    }

    @Test func deadSourceVanishesEvenWithAFreshLease() throws {
        try Self.withControlPath { path, _ in
            let c = try GuestControl.create(path: path, for: Self.block)
            let child = Process()
            child.executableURL = URL(fileURLWithPath: "/bin/true")
            try child.run()
            child.waitUntilExit()
            let dead = child.processIdentifier
            #expect(dead > 0)
            #expect(kill(dead, 0) != 0 && errno == ESRCH, "pid \(dead) was reused")
            c.sourcePID = dead
            c.renewLease()
            #expect(c.pauseHolderVanished)
            c.sourcePID = getpid()
            #expect(!c.pauseHolderVanished)
        }
    }

    // MARK: - the shared bitmap

    @Test func bitmapIsSharedBetweenOpeners() throws {
        try Self.withControlPath { path, _ in
            let guest = try GuestControl.create(path: path, for: Self.block)
            let source = try GuestControl(path: path)
            for page in [0, 5, 63, 64, 200, 255] { guest.bitmap.mark(page: page) }
            #expect(source.bitmap.dirtyCount() == 6)
            #expect(source.bitmap.isDirty(page: 200))
            var taken: [Int] = []
            source.bitmap.harvestAll { taken.append($0) }
            #expect(taken == [0, 5, 63, 64, 200, 255])
            #expect(guest.bitmap.dirtyCount() == 0)
            #expect(!guest.bitmap.isDirty(page: 5))
            // And the other way round.
            source.bitmap.mark(page: 100)
            #expect(guest.bitmap.harvest(word: 1) == 1 << (100 - 64))
            #expect(source.bitmap.dirtyCount() == 0)
        }
    }

    @Test func bitmapOutlivesItsControlObject() throws {
        try Self.withControlPath { path, _ in
            let bitmap: DirtyBitmap = try {
                let c = try GuestControl.create(path: path, for: Self.block)
                return c.bitmap
            }()
            // The mapping stays alive through the bitmap alone.
            bitmap.mark(page: 77)
            #expect(try GuestControl(path: path).bitmap.isDirty(page: 77))
        }
    }

    // MARK: - several RAM blocks

    /// The block table round-trips, and `blockMismatch` names another
    /// order, another size, or one block against a guest of several.
    @Test func blockTableRoundTripsAndRefusesOtherBlocks() throws {
        try Self.withControlPath { path, _ in
            let blocks = [
                RAMBlock(name: "pc.ram", size: Self.MiB, pageSize: 4096), RAMBlock(name: "vga.vram", size: 64 << 10, pageSize: 4096),
            ]
            let whole = RAMBlock(name: "pc.ram+vga.vram", size: Self.MiB + (64 << 10), pageSize: 4096)
            _ = try GuestControl.create(path: path, for: whole, blocks: blocks)
            let c = try GuestControl(path: path)
            #expect(c.blocks == blocks)
            #expect(c.bitmap.pageCount == Int(whole.pageCount))
            #expect(c.blockMismatch(blocks) == nil)
            #expect(c.blockMismatch(blocks.reversed()) != nil)
            #expect(c.blockMismatch([RAMBlock(name: "pc.ram", size: whole.size, pageSize: 4096)]) != nil)
            var resized = blocks
            resized[1].size = 128 << 10
            #expect(c.blockMismatch(resized) != nil)
            // openOrCreate on the same path checks the blocks too.
            #expect(throws: GuestMemoryError.self) { try GuestControl.openOrCreate(path: path, for: whole, blocks: blocks.reversed()) }
            #expect(throws: Never.self) { try GuestControl.openOrCreate(path: path, for: whole, blocks: blocks) }
        }
    }

    @Test func aOneBlockFileListsNoBlocks() throws {
        try Self.withControlPath { path, _ in
            let c = try GuestControl.create(path: path, for: Self.block)
            #expect(c.blocks.isEmpty)
            #expect(c.blockMismatch([Self.block]) == nil)
        }
    }
}
