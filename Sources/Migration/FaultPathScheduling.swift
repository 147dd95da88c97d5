import Synchronization
import WorkerThreads

/// Applies `FaultPathPriority` to each thread on a postcopy fault's path as
/// it starts, and says once per process when the priority could not be had.
///
/// A fault waits on three wake-ups in turn: the destination's fault thread
/// (reads the fault, sends the request), the source's request server (reads
/// it, sends the page on the preempt channel) and the destination's preempt
/// receiver (places the page). Each of these threads blocks between short
/// pieces of work, so giving them real time costs the others little, and
/// takes the wait for a CPU out of the fault latency.
struct FaultPathScheduling: Sendable {
    let priority: FaultPathPriority
    let notice: @Sendable (String) -> Void

    init(_ priority: FaultPathPriority, notice: @escaping @Sendable (String) -> Void) {
        self.priority = priority
        self.notice = notice
    }

    /// Once per process: a thread that could not get real time says so.
    private static let told = Atomic<Bool>(false)

    /// Call first thing on the thread itself; `role` names it in the notice.
    func apply(to role: String) {
        let said: String
        switch priority.apply() {
        case .realtime, .asStarted: return
        case .nice(let e):
            said = "runs at nice -10 instead (real-time scheduling refused: errno \(e))"
        case .unchanged(let e):
            said = "runs at normal priority (real-time scheduling refused: errno \(e))"
        }
        guard !Self.told.exchange(true, ordering: .relaxed) else { return }
        notice(
            "postcopy: \(role) \(said); fault latency may grow when the CPUs are busy. Run as root or with CAP_SYS_NICE, "
                + "or pass --fault-path-priority normal to silence this")
    }
}
