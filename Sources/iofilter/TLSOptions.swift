import ArgumentParser
import IOFilterModel

/// TLS for served NBD clients, as nbdkit and qemu-nbd take it: `serve` and `vm create`.
struct TLSOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Require TLS with pre-shared keys from this psktool file (username:hexkey lines).", valueName: "file"))
    var tlsPsk: String?

    @Option(help: ArgumentHelp("Require TLS with X.509 certificates from this directory (ca-cert.pem, server-cert.pem, server-key.pem).", valueName: "dir"))
    var tlsCertificates: String?

    @Flag(help: "With --tls-certificates: clients must present a certificate the CA signed.")
    var tlsVerifyPeer = false

    func validate() throws {
        if let problem = settings?.problem { throw ValidationError("TLS: \(problem) (--tls-psk FILE or --tls-certificates DIR)") }
    }

    /// Nil when no TLS option was given; paths made absolute.
    var settings: TLSSettings? {
        guard tlsPsk != nil || tlsCertificates != nil || tlsVerifyPeer else { return nil }
        return TLSSettings(pskFile: tlsPsk.map(absolutePath), certificatesDirectory: tlsCertificates.map(absolutePath), verifyPeer: tlsVerifyPeer)
    }
}
