// libFuzzer target: the channel hello and the hello challenge decoders.
// Built with the MigrationWire sources (tools/fuzz.sh). The input is what a
// peer sends first; a decoder may throw a WireError, never trap, and what
// it accepts must encode back to the same bytes.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzHello(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    // An exact-size copy, so a read past the input is a heap overflow ASan sees.
    let input = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
    defer { input.deallocate() }
    if size > 0 { input.copyMemory(from: UnsafeRawBufferPointer(start: data, count: size)) }
    let bytes = UnsafeRawBufferPointer(input)

    // The destination reads the preamble on its own first (HelloGate).
    _ = try? ChannelHello.checkPreamble(UnsafeRawBufferPointer(rebasing: bytes.prefix(ChannelHello.preambleSize)))
    if let hello = try? ChannelHello.decode(bytes) {
        precondition(size >= ChannelHello.size, "decoded a hello from \(size) bytes")
        precondition(hello.encoded() == Array(bytes.prefix(ChannelHello.size)), "hello does not round-trip")
        _ = hello.session.description
    }
    if let challenge = try? HelloChallenge.decode(bytes) {
        precondition(size >= HelloChallenge.size, "decoded a challenge from \(size) bytes")
        let again = challenge.encoded().withUnsafeBytes { try? HelloChallenge.decode($0) }
        precondition(again == challenge, "challenge does not round-trip")
    }
    return 0
}
