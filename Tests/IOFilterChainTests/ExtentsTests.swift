import CIOFilter
import Testing

@testable import IOFilterChain

/// How block-status answers are edited on their way up: splitting, merging, clipping.
@Suite struct ExtentsTests {
    let hole = UInt32(IOF_EXTENT_HOLE | IOF_EXTENT_ZERO)

    func triples(_ extents: Extents) -> [[UInt64]] {
        (0..<extents.count).map { [extents.offsets[$0], extents.lengths[$0], UInt64(extents.flags[$0])] }
    }

    @Test func appendingMergesNeighboursThatAgree() {
        let extents = Extents()
        extents.append(length: 10, flags: hole, at: 100)
        extents.append(length: 5, flags: hole, at: 110)
        extents.append(length: 5, flags: 0, at: 115)
        #expect(triples(extents) == [[100, 15, 3], [115, 5, 0]])
        #expect(extents.end == 120)
    }

    @Test func settingARangeSplitsAndMerges() {
        let extents = Extents()
        extents.append(length: 100, flags: hole, at: 0)
        extents.set(offset: 40, length: 10, flags: 0)
        #expect(triples(extents) == [[0, 40, 3], [40, 10, 0], [50, 50, 3]])
        // Across several extents, merging with the neighbour it now matches.
        extents.set(offset: 45, length: 30, flags: hole)
        #expect(triples(extents) == [[0, 40, 3], [40, 5, 0], [45, 55, 3]])
        // Everything becomes data.
        extents.set(offset: 0, length: 1000, flags: 0)
        #expect(triples(extents) == [[0, 100, 0]])
    }

    @Test func settingIsClippedToWhatIsCovered() {
        let extents = Extents()
        extents.append(length: 50, flags: hole, at: 1000)
        extents.set(offset: 0, length: 10, flags: 0)
        extents.set(offset: 1040, length: 100, flags: 0)
        #expect(triples(extents) == [[1000, 40, 3], [1040, 10, 0]])
        let empty = Extents()
        empty.set(offset: 0, length: 10, flags: 0)
        #expect(empty.count == 0)
    }
}
