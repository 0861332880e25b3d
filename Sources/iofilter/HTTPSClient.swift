import Foundation
import IOFilterHTTP
import IOFilterPosix
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// How the CLI reaches iofilterd: the blocking client over a unix socket or plain TCP,
/// or HTTPS for a listener off loopback.
protocol APITransport {
    func send(_ request: HTTPRequest) throws -> HTTPResponse
}

// Its `send` throws the CLI's CLIFailure, which satisfies the protocol.
extension HTTPClient: APITransport {}

/// One request per connection over TLS (NIO and NIOSSL, which the daemon's server uses
/// too), verified against the system's trust store or `caFile`, and the listener's name.
final class HTTPSClient: APITransport {
    let host: String
    let port: Int
    let configuration: TLSConfiguration

    init(host: String, port: Int, caFile: String?) {
        self.host = host
        self.port = port
        var configuration = TLSConfiguration.makeClientConfiguration()
        if let caFile { configuration.trustRoots = .file(caFile) }
        configuration.minimumTLSVersion = .tlsv12
        self.configuration = configuration
    }


    func send(_ request: HTTPRequest) throws -> HTTPResponse {
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch {
            throw CLIFailure(description: "cannot set up TLS: \(error)")
        }
        let group = MultiThreadedEventLoopGroup.singleton
        let answer = group.next().makePromise(of: HTTPResponse.self)
        // A name is checked against the certificate; an address too (its IP SAN).
        let serverName = host.first?.isLetter == true ? host : nil
        let channel: any Channel
        do {
            channel = try ClientBootstrap(group: group)
                .connectTimeout(.seconds(10))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: serverName))
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(ResponseCollector(answer: answer))
                    }
                }
                .connect(host: host, port: port).wait()
        } catch {
            throw CLIFailure(description: "cannot connect to iofilterd at https://\(host):\(port): \(error)")
        }
        defer { _ = try? channel.close().wait() }
        var head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: request.method), uri: request.target)
        head.headers.add(name: "Host", value: Sockets.authority(host: host, port: port))
        head.headers.add(name: "Content-Length", value: String(request.body.count))
        head.headers.add(name: "Connection", value: "close")
        for (name, value) in request.headers { head.headers.add(name: name, value: value) }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if !request.body.isEmpty { channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: request.body))), promise: nil) }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        do {
            return try answer.futureResult.wait()
        } catch {
            throw CLIFailure(description: "iofilterd at https://\(host):\(port): \(error)")
        }
    }
}

/// Gathers one response.
private final class ResponseCollector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    let answer: EventLoopPromise<HTTPResponse>
    private var status = 0
    private var headers: [(String, String)] = []
    private var body: [UInt8] = []

    init(answer: EventLoopPromise<HTTPResponse>) { self.answer = answer }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
            headers = head.headers.map { ($0.name, $0.value) }
        case .body(let buffer):
            body += buffer.readableBytesView
        case .end:
            answer.succeed(HTTPResponse(status: status, headers: headers, body: body))
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        answer.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        answer.fail(CLIFailure(description: "the connection closed before an answer"))
    }
}
