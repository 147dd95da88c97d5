import Foundation
import GuestMemory
import SystemPackage
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Ownership locks and the incomplete mark. Open-file-description locks of
/// two descriptors conflict even within one process, so one process can
/// play both claimants.
@Suite("OwnerLock and IncompleteMark")
struct OwnerLockTests {
    @Test("a role is held once; other roles are free; the holder's pid is named; closing releases it")
    func exclusivePerRole() throws {
        try RAMFileTests.withTempDir { dir in
            let path = FilePath(dir.appendingPathComponent("ctl").path)
            var first: OwnerLock? = try OwnerLock.acquire(.guest, on: path, create: true) { "busy: \($0)" }
            #expect(first?.created == true)
            #expect(try OwnerLock.holder(of: .guest, on: path)?.pid == getpid())
            #expect(try OwnerLock.holder(of: .source, on: path) == nil)
            do {
                _ = try OwnerLock.acquire(.guest, on: path) { "busy: \($0)" }
                Issue.record("a second claim of the guest byte succeeded")
            } catch let error as GuestMemoryError {
                #expect(error.description == "busy: another livemig process (pid \(getpid()))")
            }
            // Another role's byte is independent.
            let source = try OwnerLock.acquire(.source, on: path) { "busy: \($0)" }
            #expect(source.created == false)
            first = nil
            #expect(try OwnerLock.holder(of: .guest, on: path) == nil)
            let again = try OwnerLock.acquire(.guest, on: path) { "busy: \($0)" }
            withExtendedLifetime((again, source)) {}
        }
    }

    @Test("claimRAM refuses a RAM file in use, naming it and the holder")
    func claimRAMMessage() throws {
        try RAMFileTests.withTempDir { dir in
            let path = FilePath(dir.appendingPathComponent("ram").path)
            let held = try OwnerLock.claimRAM(path, create: true)
            #expect(throws: GuestMemoryError.self) { _ = try OwnerLock.claimRAM(path) }
            do {
                _ = try OwnerLock.claimRAM(path)
            } catch let error as GuestMemoryError {
                #expect(error.description.contains("RAM file \(path) is in use by another livemig process (pid \(getpid())"))
                #expect(error.description.contains("give another path"))
            }
            withExtendedLifetime(held) {}
        }
    }

    @Test("holder of an absent file is nobody")
    func absentFile() throws {
        #expect(try OwnerLock.holder(of: .guest, on: "/nonexistent/livemig.ctl") == nil)
    }

    @Test("the incomplete mark is set, seen, refused and cleared")
    func incompleteMark() throws {
        try RAMFileTests.withTempDir { dir in
            let path = FilePath(dir.appendingPathComponent("ram").path)
            _ = FileManager.default.createFile(atPath: path.string, contents: Data(count: 4096))
            #expect(!IncompleteMark.isSet(on: path))
            try IncompleteMark.refuseMarked(path)
            guard try IncompleteMark.set(on: path) else { return }  // no user xattrs here
            #expect(IncompleteMark.isSet(on: path))
            #expect(throws: GuestMemoryError.self) { try IncompleteMark.refuseMarked(path) }
            try IncompleteMark.clear(on: path)
            #expect(!IncompleteMark.isSet(on: path))
            try IncompleteMark.clear(on: path)  // clearing twice is fine
        }
    }

    /// Runs a program quietly; true when it exited 0.
    static func run(_ program: String, _ args: [String]) -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }

    @Test("a full file system while pre-faulting says so, not 'Bad address'")
    func populateOnFullFileSystem() throws {
        try RAMFileTests.withTempDir { dir in
            let mount = dir.appendingPathComponent("small").path
            try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: false)
            guard Self.run("/bin/mount", ["-t", "tmpfs", "-o", "size=4M", "tmpfs", mount]) else { return }  // not root: skip
            defer { _ = Self.run("/bin/umount", [mount]) }
            let ram = try RAMFile.create(path: FilePath(mount + "/ram"), size: 8 << 20)
            do {
                try ram.populate(forWriting: true)
                Issue.record("pre-faulting 8 MiB on a 4 MiB tmpfs succeeded")
            } catch let error as GuestMemoryError {
                #expect(error.description.contains("file system is full"), "\(error)")
                #expect(!error.description.contains("Bad address"), "\(error)")
            }
        }
    }
}
