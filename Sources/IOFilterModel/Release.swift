import CIOFilter

/// What this build is, as `--version` and the API's host resource report it.
public enum Release {
    /// The version of the programs (the CHANGELOG's next release).
    public static let version = "0.3.0"
    /// The plug-in ABI the host speaks: plug-ins of this major and any minor up to it load.
    public static let abi = "\(IOF_ABI_MAJOR).\(IOF_ABI_MINOR)"
    /// "0.3.0 (plug-in ABI 1.3)".
    public static let description = "\(version) (plug-in ABI \(abi))"
}
