import ArgumentParser
import CShims
import OSCall

#if canImport(Glibc)
    import Glibc
#endif

/// The `livemig` command: live migration of a mapped guest RAM file.
struct Livemig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "livemig",
        abstract: "Live-migrate the memory of a running guest between processes or hosts.",
        discussion: """
            Addresses are tcp:HOST:PORT or unix:PATH. Start `receive` first; it prints \
            'listening on ADDR' on stderr when the source may connect.
            Exit status: 0 success, 1 the migration failed, 2 bad usage.
            """,
        subcommands: [
            SendCommand.self, ReceiveCommand.self, StressCommand.self, VerifyCommand.self, RunCommand.self, DirtyrateCommand.self,
            KeygenCommand.self,
        ]
    )
}

/// Exit status for a failed migration (usage errors use 2).
let exitFailure: Int32 = 1
let exitUsage: Int32 = 2

@main
enum LivemigMain {
    static func main() {
        // Tests take io_uring away as a container's seccomp filter would.
        if getenv("LIVEMIG_TEST_DENY_IO_URING") != nil {
            let rc = lm_deny_io_uring()
            if rc != 0 { fail("cannot install the test seccomp filter: \(SystemCall.error(negated: rc))", status: exitFailure) }
        }
        // A vanished peer must be an error we report, not a silent SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        lm_keep_freed_memory()
        do {
            var command = try Livemig.parseAsRoot()
            try command.run()
        } catch let e as CommandFailure {
            fail(e.message, status: e.status)
        } catch {
            // Help, version and usage errors come from the parser (also from
            // run() of a command group): let it say them, with our statuses.
            switch Livemig.exitCode(for: error) {
            case .success:
                print(Livemig.fullMessage(for: error))
                exit(0)
            case .validationFailure:
                FileHandleStderr.write(Livemig.fullMessage(for: error) + "\n")
                exit(exitUsage)
            default:
                fail(Livemig.fullMessage(for: error), status: exitFailure)
            }
        }
    }
}

/// A failure the subcommands report: one line and an exit status.
struct CommandFailure: Error {
    var message: String
    var status: Int32 = exitFailure
}

func fail(_ message: String, status: Int32) -> Never {
    FileHandleStderr.write("livemig: error: \(message)\n")
    exit(status)
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var s = s
        s.withUTF8 { b in _ = Glibc.write(2, b.baseAddress, b.count) }
    }

    static var isTerminal: Bool { isatty(2) == 1 }
}
