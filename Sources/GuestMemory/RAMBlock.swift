/// The geometry of one guest RAM block: a named, page-aligned range of guest
/// memory, as QEMU's `RAMBlock` ("pc.ram").
///
/// Offsets in this project are byte offsets from the start of the block.
public struct RAMBlock: Sendable, Equatable {
    /// The block's name; it travels in the RAM layout message.
    public var name: String
    /// Size in bytes; a multiple of `pageSize`.
    public var size: UInt64
    /// The guest page size in bytes (a power of two).
    public var pageSize: UInt64

    /// The name QEMU gives a PC's main RAM block.
    public static let defaultName = "pc.ram"

    public init(name: String = RAMBlock.defaultName, size: UInt64, pageSize: UInt64) {
        self.name = name
        self.size = size
        self.pageSize = pageSize
    }

    /// Number of pages in the block.
    public var pageCount: Int { Int(size / pageSize) }

    /// The page that holds byte `offset`.
    @inlinable public func page(at offset: UInt64) -> Int { Int(offset / pageSize) }

    /// The byte offset of page `index`.
    @inlinable public func offset(ofPage index: Int) -> UInt64 { UInt64(index) &* pageSize }

    /// The host's base page size (sysconf(_SC_PAGESIZE)).
    public static var hostPageSize: UInt64 { UInt64(sysconf(Int32(_SC_PAGESIZE))) }
}

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif
