// libFuzzer target: the stress guest's state decoder (StressState.decode),
// which `stress --resume` runs on whatever the control file's state area
// holds after a migration. Built with Sources/Workload/StressState.swift and
// a stand-in GuestMemory module that holds only GuestMemoryError
// (Fuzz/Shims/GuestMemory.swift), as one module named Workload, so the
// harness sees what Workload's own code sees. What decodes must encode back.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzStressState(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    switch StressState.decode(bytes) {
    case .success(let state):
        let encoded = state.encoded()
        precondition(encoded.count == state.byteCount && encoded.count <= size, "encoded \(encoded.count) of \(size) bytes")
        guard case .success(let again) = StressState.decode(encoded) else { preconditionFailure("state does not decode again") }
        precondition(again.slots == state.slots && again.threads == state.threads && again.pageCount == state.pageCount)
        for t in 0..<state.threads {
            let slice = StressState.slice(t, threads: state.threads, pageCount: state.pageCount)
            precondition(!slice.isEmpty, "thread \(t) of \(state.threads) owns no page of \(state.pageCount)")
        }
    case .failure(let error):
        _ = error.description
    }
    return 0
}
