import Glibc

/// Where a file's data and holes are, from lseek's SEEK_DATA and SEEK_HOLE.
public enum SparseFile {
    // <unistd.h> under _GNU_SOURCE, which Glibc's Swift module does not import.
    static let seekData: Int32 = 3
    static let seekHole: Int32 = 4

    /// Calls `emit` with runs of [offset, offset+length), contiguous from `offset`, each
    /// data or a hole, until it returns false. A file system without hole information
    /// (or a block device) reports all data.
    public static func runs(_ fd: Int32, offset: UInt64, length: UInt64, _ emit: (_ length: UInt64, _ hole: Bool) -> Bool) {
        let stop = offset + length
        var position = offset
        while position < stop {
            let data = lseek(fd, off_t(position), seekData)
            if data < 0 {
                // ENXIO: no data past `position` (the rest is a hole). Anything else: no
                // hole information at all.
                _ = emit(stop - position, errno == ENXIO)
                return
            }
            if UInt64(data) > position {
                let end = min(UInt64(data), stop)
                if !emit(end - position, true) { return }
                position = end
                continue
            }
            let hole = lseek(fd, off_t(position), seekHole)
            let dataEnd = max(hole < 0 ? stop : min(UInt64(hole), stop), position + 1)
            if !emit(dataEnd - position, false) { return }
            position = dataEnd
        }
    }
}
