#ifndef IOF_CTLS_H
#define IOF_CTLS_H

#include <stddef.h>

/* TLS for NBD, on GnuTLS (what libnbd, nbdkit and QEMU use): server credentials loaded
 * once, by the process that terminates TLS for a VM's worker (never the worker, whose
 * plug-ins could read them), and a session per client whose plaintext crosses a
 * socket pair the NBD code serves as if it were the client's socket. */

typedef struct iof_tls_credentials iof_tls_credentials;

/* A psktool file ("username:hexkey" per line). NULL with `error` filled on failure. */
iof_tls_credentials *iof_tls_load_psk(const char *path, char *error, size_t error_size);

/* A directory with ca-cert.pem, server-cert.pem and server-key.pem (as nbdkit and
 * qemu-nbd read it). With verify_peer, clients must present a certificate the CA
 * signed. NULL with `error` filled on failure. */
iof_tls_credentials *iof_tls_load_x509(const char *directory, int verify_peer, char *error, size_t error_size);

/* Runs the TLS handshake as the server on `fd` (within `timeout_ms`), then carries the
 * session's plaintext to and from `plain` (a socket, usually one end of a pair) on two
 * threads until either side closes. The session keeps a dup of `fd`; the caller still
 * closes its own. `plain` is the session's from the call on, on failure too (then it is
 * closed, which its peer sees as the end). -1 with `error` filled on failure. */
int iof_tls_accept_into(iof_tls_credentials *credentials, int fd, int plain, int timeout_ms, char *error, size_t error_size);

/* The same, returning the caller's end of a new socket pair that carries the session's
 * plaintext (a partner daemon's sessions with its peers). */
int iof_tls_accept(iof_tls_credentials *credentials, int fd, int timeout_ms, char *error, size_t error_size);

/* The client side with a pre-shared key: the handshake on `fd`, then returns the
 * caller's end of a socket pair that carries the session's plaintext. */
int iof_tls_connect_psk(int fd, const char *username, const unsigned char *key, size_t key_size, int timeout_ms,
                        char *error, size_t error_size);

#endif
