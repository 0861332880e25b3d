/// The web console iofilterd serves on its listeners (`GET /`): one page whose script
/// talks to this same API with the token the user gives, so the console has exactly the
/// API's authentication and roles. The files are compiled in (Console/).
enum ConsoleAssets {
    struct Asset {
        let contentType: String
        let body: [UInt8]
    }

    static func asset(_ path: String) -> Asset? {
        switch path {
        case "/", "/console": Asset(contentType: "text/html; charset=utf-8", body: PackageResources.console_html)
        case "/console.css": Asset(contentType: "text/css; charset=utf-8", body: PackageResources.console_css)
        case "/console.js": Asset(contentType: "text/javascript; charset=utf-8", body: PackageResources.console_js)
        default: nil
        }
    }

    /// No inline script, no other origin, no framing: a page that holds a token keeps it.
    /// (No form-action: Chromium then fires no submit event, and the sign-in form is one.)
    static let securityHeaders = [
        ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    ]
}
