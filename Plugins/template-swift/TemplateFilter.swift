// A starting point for a filter in Swift: copy this folder, rename the type and the
// reverse-DNS name, and fill in `start`. It builds into a shared object that
// `iofilter plugin validate` accepts and `iofilter serve` runs like any C plug-in.
import IOFilterSDK
import Synchronization

public final class TemplateFilter: IOFilter {
    public static let metadata = FilterMetadata(
        name: "org.swift-iofilter.template",
        vendor: "swift-iofilter",
        version: "1.0.0",
        description: "Counts requests and bytes; a template for Swift filters",
        category: .inspection,
        threadModel: .parallel,
        parameters: [
            Parameter("log-every", .int(default: 0, range: 0...1_000_000_000),
                      description: "log one line every N requests (0: never)"),
        ])

    private let disk: Disk
    private let logEvery: Int64
    private let requests = Atomic<Int64>(0)
    private let bytesRead = Atomic<Int64>(0)
    private let bytesWritten = Atomic<Int64>(0)

    public init(disk: Disk) throws(FilterError) {
        self.disk = disk
        logEvery = disk.parameter("log-every", default: 0)
        disk.log(.info, "template filter opened \(disk.name) (\(disk.size) bytes)")
    }

    public func start(_ request: Request) -> Disposition {
        let count = requests.add(1, ordering: .relaxed).newValue
        switch request.operation {
        case .read: bytesRead.add(Int64(request.length), ordering: .relaxed)
        case .write: bytesWritten.add(Int64(request.length), ordering: .relaxed)
        default: break
        }
        if logEvery > 0 && count % logEvery == 0 {
            disk.log(.info, "\(count) requests so far")
        }
        return .pass
    }

    public func stats() -> [(String, Double)] {
        [("requests", Double(requests.load(ordering: .relaxed))),
         ("bytes_read", Double(bytesRead.load(ordering: .relaxed))),
         ("bytes_written", Double(bytesWritten.load(ordering: .relaxed)))]
    }
}

// The one line that makes this shared object a plug-in.
@_cdecl("iof_plugin_entry")
public func iofPluginEntry() -> UnsafeRawPointer { exportFilter(TemplateFilter.self) }
