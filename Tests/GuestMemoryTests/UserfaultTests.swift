import CShims
import Foundation
import GuestMemory
import Synchronization
import SystemPackage
import TestSupport
import Testing
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// A small RAM file on /dev/shm (tmpfs: MISSING faults work there), mapped
/// twice: `a` is registered with `userfault`, `b` is a second view of the
/// same pages, used only to look at pages already present (touching a
/// missing page through `b` would allocate it). Removed by `close()`.
final class RegisteredRAM {
    static let pageSize = 4096
    let path: String
    let a: RAMFile
    let b: RAMFile
    let userfault: Userfault
    private var registered = true

    init(pages: Int) throws {
        path = "/dev/shm/livemig-uffd-test-\(UUID().uuidString).ram"
        a = try RAMFile.create(path: FilePath(path), size: UInt64(pages * Self.pageSize))
        b = try RAMFile(path: FilePath(path), access: .readWrite)
        userfault = try Userfault()
        try userfault.registerMissing(address: address(0), length: a.block.size)
    }

    /// The address of `page` in mapping `a`.
    func address(_ page: Int) -> UInt64 { UInt64(UInt(bitPattern: a.base)) + UInt64(page * Self.pageSize) }

    /// Bytes of a present page, seen through mapping `b`.
    func viewB(_ page: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: b.base + page * Self.pageSize, count: Self.pageSize))
    }

    /// Unregisters (waking any thread still blocked, which then reads
    /// zeros) and removes the file.
    func close() {
        if registered { try? userfault.unregister(address: address(0), length: a.block.size) }
        registered = false
        unlink(path)
    }

    deinit { close() }
}

/// A thread that copies `length` bytes out of a mapping. While a page of
/// them is missing in a registered mapping it sleeps in the kernel.
final class PageReader: Sendable {
    private final class State: Sendable {
        let done = Atomic<Bool>(false)
        let bytes = Mutex<[UInt8]?>(nil)
        let finished = DispatchSemaphore(value: 0)
    }

    private let state = State()
    private let thread: WorkerThread

    init(address: UInt64, length: Int) {
        let s = state
        thread = WorkerThread(name: "test/reader") {
            let p = UnsafeRawPointer(bitPattern: UInt(address))!
            let copy = Array(UnsafeRawBufferPointer(start: p, count: length))
            s.bytes.withLock { $0 = copy }
            s.done.store(true, ordering: .releasing)
            s.finished.signal()
        }
    }

    /// Whether the read has returned.
    var isDone: Bool { state.done.load(ordering: .acquiring) }

    /// Waits up to `seconds` for the read; the bytes read, or nil.
    func result(within seconds: Double) -> [UInt8]? {
        guard state.finished.wait(timeout: .now() + seconds) == .success else { return nil }
        state.finished.signal()  // later calls see it too
        return state.bytes.withLock { $0 }
    }

    func join() { thread.join() }
}

/// Reads faults until one arrives or `seconds` pass (bounded: never hangs).
func nextFaults(_ userfault: Userfault, within seconds: Double = 10) throws -> [Userfault.Fault] {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        let faults = try userfault.readFaults(timeout: 0.1)
        if !faults.isEmpty { return faults }
    }
    return []
}

/// A page of reproducible random bytes.
func pattern(seed: UInt64, bytes: Int = RegisteredRAM.pageSize) -> [UInt8] {
    var rng = SplitMix64(seed: seed)
    return (0..<bytes / 8).flatMap { _ in withUnsafeBytes(of: rng.next()) { Array($0) } }
}

@Suite("Userfault")
struct UserfaultTests {
    static let pageSize = RegisteredRAM.pageSize

    @Test func aBlockedReaderSeesExactlyThePlacedPage() throws {
        let ram = try RegisteredRAM(pages: 16)
        let reader = PageReader(address: ram.address(3), length: Self.pageSize)
        defer {
            ram.close()  // wakes the reader if the test failed before placing
            reader.join()
        }
        let faults = try nextFaults(ram.userfault)
        try #require(faults.count == 1, "expected one fault for the missing page, got \(faults)")
        let fault = faults[0]
        #expect(fault.address == ram.address(3))
        #expect(!fault.write)
        if ram.userfault.reportsThreadID { #expect(fault.threadID != 0) }
        #expect(!reader.isDone, "the reader returned before its page was placed")

        let page = pattern(seed: 3)
        let placed = try page.withUnsafeBytes { try ram.userfault.copy(to: fault.address, from: $0.baseAddress!, length: Self.pageSize) }
        #expect(placed == .placed)
        let seen = try #require(reader.result(within: 10), "the reader did not wake after its page was placed")
        #expect(seen == page)
        #expect(ram.viewB(3) == page, "the other mapping of the file sees another page")
        #expect(ram.userfault.reportsThreadID, "this kernel grants UFFD_FEATURE_THREAD_ID (since 4.14)")
    }

    @Test func aPresentPageIsKeptAndReportedAlreadyPresent() throws {
        let ram = try RegisteredRAM(pages: 8)
        defer { ram.close() }
        let first = pattern(seed: 10), second = pattern(seed: 11)
        let a = try first.withUnsafeBytes { try ram.userfault.copy(to: ram.address(2), from: $0.baseAddress!, length: Self.pageSize) }
        #expect(a == .placed)
        let b = try second.withUnsafeBytes { try ram.userfault.copy(to: ram.address(2), from: $0.baseAddress!, length: Self.pageSize) }
        #expect(b == .alreadyPresent)
        #expect(ram.viewB(2) == first, "EEXIST must keep the page's bytes")

        // A range whose middle page is present: the others are placed.
        let three = pattern(seed: 12, bytes: 3 * Self.pageSize)
        let c = try three.withUnsafeBytes { try ram.userfault.copy(to: ram.address(1), from: $0.baseAddress!, length: 3 * Self.pageSize) }
        #expect(c == .alreadyPresent)
        #expect(ram.viewB(1) == Array(three[0..<Self.pageSize]))
        #expect(ram.viewB(2) == first)
        #expect(ram.viewB(3) == Array(three[2 * Self.pageSize..<3 * Self.pageSize]))
    }

    @Test func zeroPagePlacesZerosAndWakesTheReader() throws {
        let ram = try RegisteredRAM(pages: 8)
        let reader = PageReader(address: ram.address(5), length: Self.pageSize)
        defer {
            ram.close()
            reader.join()
        }
        let faults = try nextFaults(ram.userfault)
        try #require(faults.map(\.address) == [ram.address(5)])
        #expect(try ram.userfault.zeroPage(at: ram.address(5), length: Self.pageSize) == .placed)
        let seen = try #require(reader.result(within: 10))
        #expect(seen.allSatisfy { $0 == 0 })
        // Zero-filling it again finds it present.
        #expect(try ram.userfault.zeroPage(at: ram.address(5), length: Self.pageSize) == .alreadyPresent)
        // Several pages at once.
        #expect(try ram.userfault.zeroPage(at: ram.address(6), length: 2 * Self.pageSize) == .placed)
        #expect(ram.viewB(7).allSatisfy { $0 == 0 })
    }

    @Test func aPageNeverPlacedKeepsItsReaderWaiting() throws {
        let ram = try RegisteredRAM(pages: 16)
        let reader = PageReader(address: ram.address(7), length: Self.pageSize)
        defer {
            ram.close()
            reader.join()
        }
        let faults = try nextFaults(ram.userfault)
        try #require(faults.map(\.address) == [ram.address(7)])
        // Other pages placed meanwhile do not release it.
        let other = pattern(seed: 8)
        _ = try other.withUnsafeBytes { try ram.userfault.copy(to: ram.address(8), from: $0.baseAddress!, length: Self.pageSize) }
        _ = try ram.userfault.zeroPage(at: ram.address(6), length: Self.pageSize)
        try ram.userfault.wake(address: ram.address(6), length: UInt64(3 * Self.pageSize))
        // A woken thread whose page is still missing faults again: it stays
        // in the kernel, and the fault is reported once more.
        #expect(reader.result(within: 0.3) == nil, "the reader returned although its page was never placed")
        #expect(!reader.isDone)
        let again = try nextFaults(ram.userfault)
        #expect(again.map(\.address) == [ram.address(7)])

        let page = pattern(seed: 7)
        _ = try page.withUnsafeBytes { try ram.userfault.copy(to: ram.address(7), from: $0.baseAddress!, length: Self.pageSize) }
        #expect(try #require(reader.result(within: 10)) == page)
    }

    @Test func aWriteFaultSaysSo() throws {
        let ram = try RegisteredRAM(pages: 4)
        let address = ram.address(1)
        let writer = WorkerThread(name: "test/writer") {
            UnsafeMutableRawPointer(bitPattern: UInt(address))!.storeBytes(of: UInt64(0xABCD), as: UInt64.self)
        }
        var joined = false  // join exactly once (twice is undefined)
        defer {
            ram.close()
            if !joined { writer.join() }
        }
        let faults = try nextFaults(ram.userfault)
        try #require(faults.count == 1)
        #expect(faults[0].address == address)
        #expect(faults[0].write)
        _ = try ram.userfault.zeroPage(at: address, length: Self.pageSize)
        writer.join()
        joined = true
        #expect(ram.viewB(1).prefix(8) == [0xCD, 0xAB, 0, 0, 0, 0, 0, 0])
    }

    @Test func discardedPagesFaultAgainInTheRegisteredMapping() throws {
        let ram = try RegisteredRAM(pages: 8)
        defer { ram.close() }
        // Page 2 placed, then read through the registered mapping: present,
        // no fault.
        let old = pattern(seed: 20)
        _ = try old.withUnsafeBytes { try ram.userfault.copy(to: ram.address(2), from: $0.baseAddress!, length: Self.pageSize) }
        let direct = PageReader(address: ram.address(2), length: Self.pageSize)
        #expect(direct.result(within: 10) == old)
        direct.join()

        try ram.a.discard(offset: UInt64(2 * Self.pageSize), length: UInt64(Self.pageSize))
        let reader = PageReader(address: ram.address(2), length: Self.pageSize)
        defer {
            ram.close()
            reader.join()
        }
        let faults = try nextFaults(ram.userfault)
        #expect(faults.map(\.address) == [ram.address(2)], "a discarded page must fault again")
        let new = pattern(seed: 21)
        #expect(
            try new.withUnsafeBytes { try ram.userfault.copy(to: ram.address(2), from: $0.baseAddress!, length: Self.pageSize) } == .placed)
        #expect(reader.result(within: 10) == new)
    }

    @Test func discardRefusesARangeOutsideTheFile() throws {
        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        #expect(throws: GuestMemoryError.self) { try ram.a.discard(offset: 1, length: 4096) }
        let e = #expect(throws: GuestMemoryError.self) { try ram.a.discard(offset: 4096, length: 4 * 4096) }
        #expect(e?.description.contains("inside the file") == true)
        try ram.a.discard(offset: 0, length: 0)
    }

    @Test func readFaultsReturnsNothingWhenNoneWait() throws {
        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        #expect(try ram.userfault.readFaults(timeout: 0).isEmpty)
        #expect(try ram.userfault.readFaults(timeout: 0.05).isEmpty)
    }

    @Test func misuseThrowsClearErrors() throws {
        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        let page = pattern(seed: 1)
        let unaligned = #expect(throws: GuestMemoryError.self) {
            try page.withUnsafeBytes { _ = try ram.userfault.copy(to: ram.address(1) + 8, from: $0.baseAddress!, length: 4096) }
        }
        #expect(unaligned?.description.contains("multiples of the page size") == true)
        // An address no registered mapping covers.
        let outside = #expect(throws: GuestMemoryError.self) {
            try page.withUnsafeBytes { _ = try ram.userfault.copy(to: ram.address(64), from: $0.baseAddress!, length: 4096) }
        }
        #expect(outside?.description.contains("UFFDIO_COPY") == true)
        // Registering a mapping of a file that takes no MISSING faults.
        try RAMFileTests.withTempDir { dir in
            let disk = try RAMFile.create(path: FilePath(dir.appendingPathComponent("ram").path), size: 65536)
            guard lm_statfs_type(disk.path.string) != Int64(LM_TMPFS_MAGIC) else { return }
            let uf = try Userfault()
            let e = #expect(throws: GuestMemoryError.self) {
                try uf.registerMissing(address: UInt64(UInt(bitPattern: disk.base)), length: 65536)
            }
            #expect(e?.description.contains("UFFDIO_REGISTER") == true)
        }
    }

    @Test func adoptingADescriptorKeepsWhatItIsTold() throws {
        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        let copy = dup(ram.userfault.fd)
        let adopted = Userfault(adopting: copy, threadIDs: true)
        #expect(adopted.fd == copy)
        #expect(adopted.reportsThreadID)
        #expect(!Userfault(adopting: dup(ram.userfault.fd)).reportsThreadID)
        // The copy acts on the same registration.
        #expect(try adopted.zeroPage(at: ram.address(0), length: Self.pageSize) == .placed)
        #expect(try ram.userfault.zeroPage(at: ram.address(0), length: Self.pageSize) == .alreadyPresent)
    }
}

@Suite("RAMFile postcopy")
struct RAMFilePostcopyTests {
    @Test func tmpfsIsAccepted() throws {
        #expect(RAMFile.postcopyRefusal(for: FilePath("/dev/shm/livemig-not-there-\(UUID().uuidString)")) == nil)
        let path = "/dev/shm/livemig-refusal-\(UUID().uuidString)"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 4096)))
        defer { unlink(path) }
        #expect(RAMFile.postcopyRefusal(for: FilePath(path)) == nil)
    }

    @Test func aFileInThePackageDirectoryIsRefusedWithItsType() throws {
        let here = URL(fileURLWithPath: #filePath).deletingLastPathComponent().path
        let type = lm_statfs_type(here)
        try #require(type >= 0)
        guard type != Int64(LM_TMPFS_MAGIC), type != Int64(LM_HUGETLBFS_MAGIC) else { return }  // checkout on tmpfs
        let refusal = try #require(RAMFile.postcopyRefusal(for: FilePath(here + "/guest.ram")))
        #expect(refusal.contains("f_type 0x\(String(type, radix: 16))"), "\(refusal)")
        #expect(refusal.contains("/dev/shm"))
        if type == 0xEF53 { #expect(refusal.contains("ext2/ext3/ext4")) }
        if type == 0x794C_7630 { #expect(refusal.contains("overlayfs")) }
    }
}
