import Foundation
import GuestMemory
import SystemPackage
import Testing
import Workload

/// Runs `body` with a fresh, empty directory that is removed afterwards.
func withTempDir<R>(_ body: (URL) throws -> R) throws -> R {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("livemig-workload-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
    defer { try? FileManager.default.removeItem(at: dir) }
    return try body(dir)
}

func filePath(_ url: URL) -> FilePath { FilePath(url.path) }

/// Little-endian u32 `value` stored at `offset` of a copy of `bytes`.
func settingLE32(_ bytes: [UInt8], _ value: UInt32, at offset: Int) -> [UInt8] {
    var copy = bytes
    withUnsafeBytes(of: value.littleEndian) { copy.replaceSubrange(offset..<offset + 4, with: $0) }
    return copy
}

/// Little-endian u64 `value` stored at `offset` of a copy of `bytes`.
func settingLE64(_ bytes: [UInt8], _ value: UInt64, at offset: Int) -> [UInt8] {
    var copy = bytes
    withUnsafeBytes(of: value.littleEndian) { copy.replaceSubrange(offset..<offset + 8, with: $0) }
    return copy
}

/// The page counter (first 8 bytes) of `page`.
func counter(_ ram: RAMFile, _ page: Int) -> UInt64 {
    ram.pointer(at: UInt64(page) * ram.block.pageSize).load(as: UInt64.self)
}

func setCounter(_ ram: RAMFile, _ page: Int, _ value: UInt64) {
    ram.pointer(at: UInt64(page) * ram.block.pageSize).storeBytes(of: value, as: UInt64.self)
}

/// Writes every counter as a `counter` guest at `state` would have left it.
func writeCounters(_ ram: RAMFile, for state: StressState) {
    for t in 0..<state.threads {
        let slice = StressState.slice(t, threads: state.threads, pageCount: state.pageCount)
        let slot = state.slots[t]
        for (i, page) in slice.enumerated() {
            setCounter(ram, page, UInt64(i) < slot.position ? slot.pass + 1 : slot.pass)
        }
    }
}

/// Polls `condition` every millisecond for at most `seconds`; true once it holds.
func waitUntil(_ seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}
