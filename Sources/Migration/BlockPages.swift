import GuestMemory
import MigrationWire

// The page numbering of a guest with several RAM blocks (docs/PROTOCOL.md
// §3): the blocks lie side by side in layout order, and the engines number
// pages across all of them. The wire names a page by block id and its page
// in that block; these types convert at the edge.

/// Which RAM block a page of the whole range (`RAMFile.blocks` side by
/// side) is in, for a walk that mostly visits pages in rising order: one
/// compare per page, a search only when the walk crosses into another block.
struct BlockCursor {
    /// The first page of each block, and one past the last block's end.
    private let firstPages: [Int]
    private var index = 0

    init(_ ram: RAMFile) {
        var first = [0]
        for b in ram.blocks { first.append(first.last! + b.pageCount) }
        firstPages = first
    }

    @inline(__always) mutating func block(ofPage page: Int) -> UInt32 {
        if page < firstPages[index] || page >= firstPages[index + 1] {
            index = 0
            while page >= firstPages[index + 1] { index += 1 }
        }
        return UInt32(index)
    }
}

/// Converts page ranges between the engines' numbering across blocks and
/// the wire's (block id, page in that block), checking what comes in.
struct PageNumbering: Sendable {
    /// The first page of each block, and one past the last block's end.
    let firstPages: [Int]

    init(_ ram: RAMFile) {
        var first = [0]
        for b in ram.blocks { first.append(first.last! + b.pageCount) }
        firstPages = first
    }

    var pageCount: Int { firstPages.last! }

    /// The block that holds `page` and its pages' range.
    func block(of page: Int) -> (id: Int, pages: Range<Int>) {
        var i = 0
        while page >= firstPages[i + 1] { i += 1 }
        return (i, firstPages[i]..<firstPages[i + 1])
    }

    /// `first` and `count` pages on from it, within one block, for the wire.
    func wire(first: Int, count: Int) -> PageRange {
        let b = block(of: first)
        precondition(first + count <= b.pages.upperBound, "a page range crosses the end of block \(b.id)")
        return PageRange(block: UInt32(b.id), first: UInt64(first - b.pages.lowerBound), count: UInt64(count))
    }

    /// A range from the wire in the engines' numbering (`block` kept), or
    /// nil when it names no block, no page, or pages past its block's end.
    func local(_ r: PageRange) -> PageRange? {
        guard Int(r.block) < firstPages.count - 1 else { return nil }
        let start = firstPages[Int(r.block)], pages = UInt64(firstPages[Int(r.block) + 1] - start)
        guard r.count > 0, r.first < pages, r.count <= pages - r.first else { return nil }
        return PageRange(block: r.block, first: UInt64(start) + r.first, count: r.count)
    }

    /// Splits the engines' pages `first..<end` at block ends, for the wire.
    func wireRanges(first: Int, end: Int) -> [PageRange] {
        var out: [PageRange] = []
        var page = first
        while page < end {
            let b = block(of: page)
            let stop = min(end, b.pages.upperBound)
            out.append(wire(first: page, count: stop - page))
            page = stop
        }
        return out
    }

    /// What to say of a range from the wire that `local` refused.
    func describe(_ r: PageRange) -> String {
        "pages \(r.first)..+\(r.count) of block \(r.block); the RAM has \(firstPages.count - 1) block(s) of "
            + (0..<firstPages.count - 1).map { "\(firstPages[$0 + 1] - firstPages[$0])" }.joined(separator: ", ") + " pages"
    }
}
