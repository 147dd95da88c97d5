import CShims
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// The mark of a RAM file a migration is writing or failed to finish: the
/// extended attribute `user.livemig.incomplete` (docs/PROTOCOL.md §6).
///
/// A destination sets it on a RAM file that existed before, before the
/// first page can land, and removes it only when the migration completed.
/// A file that still carries it holds a mix of old and new pages: the guest
/// commands refuse it (`refuseMarked(_:)`), so a failed migration never
/// leaves a file that looks good.
public enum IncompleteMark {
    /// The attribute's name.
    public static let attribute = "user.livemig.incomplete"

    /// Marks the file at `path`. Returns false when its file system does not
    /// take user extended attributes (the caller warns and goes on).
    public static func set(on path: FilePath) throws(GuestMemoryError) -> Bool {
        let value: [UInt8] = Array("1".utf8)
        let r = lm_setxattr(path.string, attribute, value, value.count)
        if r == 0 { return true }
        let e = Errno(rawValue: -r)
        if unsupported(e) { return false }
        throw GuestMemoryError("cannot mark RAM file \(path) incomplete (setxattr \(attribute)): \(e)", errno: e)
    }

    /// Removes the mark from the file at `path` (nothing when it has none).
    public static func clear(on path: FilePath) throws(GuestMemoryError) {
        let r = lm_removexattr(path.string, attribute)
        if r == 0 { return }
        let e = Errno(rawValue: -r)
        if e == Errno(rawValue: ENODATA) || unsupported(e) { return }
        throw GuestMemoryError("cannot remove the incomplete mark from RAM file \(path) (removexattr \(attribute)): \(e)", errno: e)
    }

    /// Whether the file at `path` carries the mark. A file system without
    /// user attributes, or a file that cannot be read, carries none.
    public static func isSet(on path: FilePath) -> Bool {
        lm_getxattr_size(path.string, attribute) >= 0
    }

    /// Throws when the RAM file at `path` carries the mark: a migration into
    /// it did not complete, so its pages are a mix of two guests.
    public static func refuseMarked(_ path: FilePath) throws(GuestMemoryError) {
        guard isSet(on: path) else { return }
        throw GuestMemoryError(
            "RAM file \(path) is marked incomplete (extended attribute \(attribute)): the migration into it did not "
                + "complete, so it holds a mix of old and new pages; migrate the guest into it again, or remove it")
    }

    private static func unsupported(_ e: Errno) -> Bool {
        e == .notSupported || e == Errno(rawValue: EOPNOTSUPP) || e == .permissionDenied || e == .notPermitted
    }
}
