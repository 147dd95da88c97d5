// libFuzzer target: the main-channel decoders (MainMessage.decodeFrameHeader,
// then MainMessage.decode(type:payload:) on the payload it announces).
// Built with the MigrationWire sources. The input is one frame without its
// tag; whatever decodes must encode and decode back to the same message.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzMainMessage(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
    defer { input.deallocate() }
    if size > 0 { input.copyMemory(from: UnsafeRawBufferPointer(start: data, count: size)) }
    let bytes = UnsafeRawBufferPointer(input)
    let head = UnsafeRawBufferPointer(rebasing: bytes.prefix(MainMessage.frameHeaderSize))
    guard let frame = try? MainMessage.decodeFrameHeader(head) else { return 0 }
    precondition(frame.length >= 0 && frame.length <= MainMessage.maxPayload)
    guard size - MainMessage.frameHeaderSize >= frame.length else { return 0 }  // the receiver would wait for more
    let payload = UnsafeRawBufferPointer(rebasing: bytes[MainMessage.frameHeaderSize..<MainMessage.frameHeaderSize + frame.length])
    guard let message = try? MainMessage.decode(type: frame.type, payload: payload) else { return 0 }
    _ = message.name
    if case .error = message { return 0 }  // lossy by design: invalid UTF-8 is replaced, long texts cut
    let encoded = message.encoded()
    let again = encoded.withUnsafeBytes { e -> MainMessage? in
        guard let f = try? MainMessage.decodeFrameHeader(UnsafeRawBufferPointer(rebasing: e.prefix(MainMessage.frameHeaderSize))) else {
            return nil
        }
        return try? MainMessage.decode(type: f.type, payload: UnsafeRawBufferPointer(rebasing: e.dropFirst(MainMessage.frameHeaderSize)))
    }
    precondition(again == message, "\(message.name) does not round-trip")
    return 0
}
