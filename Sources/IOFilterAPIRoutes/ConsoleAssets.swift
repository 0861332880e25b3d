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
        // Browsers ask for an icon on their own, without the token: it is public.
        case "/favicon.svg", "/favicon.ico": Asset(contentType: "image/svg+xml", body: favicon)
        default: nil
        }
    }

    static let favicon = Array("""
        <svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" fill="#18202e"/>\
        <rect x="7" y="7" width="18" height="18" rx="2" fill="none" stroke="#7fb0ff" stroke-width="3"/>\
        <rect x="7" y="7" width="9" height="18" fill="#7fb0ff"/></svg>
        """.utf8)

    /// No inline script, no other origin, no framing: a page that holds a token keeps it.
    /// (No form-action: Chromium then fires no submit event, and the sign-in form is one.)
    static let securityHeaders = [
        ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    ]
}
