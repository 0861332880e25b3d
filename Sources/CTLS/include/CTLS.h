#ifndef IOF_CTLS_H
#define IOF_CTLS_H

#include <stddef.h>

/* TLS for the NBD server, on GnuTLS (what libnbd, nbdkit and QEMU use): credentials
 * loaded once, before the worker is confined, and a server-side session per client that
 * hands back a plaintext socket the NBD code serves as if it were the client's. */

typedef struct iof_tls_credentials iof_tls_credentials;

/* A psktool file ("username:hexkey" per line). NULL with `error` filled on failure. */
iof_tls_credentials *iof_tls_load_psk(const char *path, char *error, size_t error_size);

/* A directory with ca-cert.pem, server-cert.pem and server-key.pem (as nbdkit and
 * qemu-nbd read it). With verify_peer, clients must present a certificate the CA
 * signed. NULL with `error` filled on failure. */
iof_tls_credentials *iof_tls_load_x509(const char *directory, int verify_peer, char *error, size_t error_size);

/* Runs the TLS handshake as the server on `fd` (within `timeout_ms`), then returns one
 * end of a socket pair that carries the session's plaintext: two threads move bytes
 * between it and the TLS session until either side closes. The session keeps a dup of
 * `fd`; the caller still closes its own. -1 with `error` filled on failure. */
int iof_tls_accept(iof_tls_credentials *credentials, int fd, int timeout_ms, char *error, size_t error_size);

/* The client side with a pre-shared key: the handshake on `fd`, then the plaintext end
 * of a socket pair as for iof_tls_accept. */
int iof_tls_connect_psk(int fd, const char *username, const unsigned char *key, size_t key_size, int timeout_ms,
                        char *error, size_t error_size);

#endif
