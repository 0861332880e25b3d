#define _GNU_SOURCE
#include "CTLS.h"

#include <errno.h>
#include <gnutls/gnutls.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

struct iof_tls_credentials {
    int is_psk;
    int verify_peer;
    gnutls_psk_server_credentials_t psk;
    gnutls_certificate_credentials_t x509;
    /* The PSK file's users and keys. */
    size_t user_count;
    char **users;
    gnutls_datum_t *keys;
};

static void fail(char *error, size_t size, const char *what, int code) {
    snprintf(error, size, "%s: %s", what, code ? gnutls_strerror(code) : strerror(errno));
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int find_psk(gnutls_session_t session, const char *username, gnutls_datum_t *key) {
    iof_tls_credentials *credentials = gnutls_session_get_ptr(session);
    for (size_t i = 0; i < credentials->user_count; i++) {
        if (strcmp(credentials->users[i], username) == 0) {
            key->data = gnutls_malloc(credentials->keys[i].size);
            if (!key->data) return -1;
            memcpy(key->data, credentials->keys[i].data, credentials->keys[i].size);
            key->size = credentials->keys[i].size;
            return 0;
        }
    }
    return -1; /* unknown user: the handshake fails */
}

iof_tls_credentials *iof_tls_load_psk(const char *path, char *error, size_t error_size) {
    FILE *file = fopen(path, "r");
    if (!file) {
        snprintf(error, error_size, "cannot read the PSK file %s: %s", path, strerror(errno));
        return NULL;
    }
    iof_tls_credentials *credentials = calloc(1, sizeof *credentials);
    credentials->is_psk = 1;
    char line[4096];
    int number = 0;
    while (fgets(line, sizeof line, file)) {
        number++;
        line[strcspn(line, "\r\n")] = 0;
        if (line[0] == 0 || line[0] == '#') continue;
        char *colon = strchr(line, ':');
        size_t hex = colon ? strlen(colon + 1) : 0;
        if (!colon || colon == line || hex == 0 || hex % 2) {
            snprintf(error, error_size, "%s line %d is not username:hexkey (as psktool writes it)", path, number);
            goto bad;
        }
        *colon = 0;
        gnutls_datum_t key = {malloc(hex / 2), (unsigned)(hex / 2)};
        for (size_t i = 0; i < hex / 2; i++) {
            int high = hex_value(colon[1 + 2 * i]), low = hex_value(colon[2 + 2 * i]);
            if (high < 0 || low < 0) {
                free(key.data);
                snprintf(error, error_size, "%s line %d: the key is not hexadecimal", path, number);
                goto bad;
            }
            key.data[i] = (unsigned char)(high << 4 | low);
        }
        credentials->users = realloc(credentials->users, (credentials->user_count + 1) * sizeof *credentials->users);
        credentials->keys = realloc(credentials->keys, (credentials->user_count + 1) * sizeof *credentials->keys);
        credentials->users[credentials->user_count] = strdup(line);
        credentials->keys[credentials->user_count] = key;
        credentials->user_count++;
    }
    fclose(file);
    file = NULL;
    if (credentials->user_count == 0) {
        snprintf(error, error_size, "%s holds no username:hexkey line", path);
        goto bad;
    }
    int rc = gnutls_psk_allocate_server_credentials(&credentials->psk);
    if (rc < 0) {
        fail(error, error_size, "gnutls_psk_allocate_server_credentials", rc);
        goto bad;
    }
    gnutls_psk_set_server_credentials_function(credentials->psk, find_psk);
    return credentials;
bad:
    if (file) fclose(file);
    for (size_t i = 0; i < credentials->user_count; i++) {
        free(credentials->users[i]);
        free(credentials->keys[i].data);
    }
    free(credentials->users);
    free(credentials->keys);
    free(credentials);
    return NULL;
}

iof_tls_credentials *iof_tls_load_x509(const char *directory, int verify_peer, char *error, size_t error_size) {
    iof_tls_credentials *credentials = calloc(1, sizeof *credentials);
    credentials->verify_peer = verify_peer;
    char ca[4096], certificate[4096], key[4096];
    snprintf(ca, sizeof ca, "%s/ca-cert.pem", directory);
    snprintf(certificate, sizeof certificate, "%s/server-cert.pem", directory);
    snprintf(key, sizeof key, "%s/server-key.pem", directory);
    int rc = gnutls_certificate_allocate_credentials(&credentials->x509);
    if (rc < 0) {
        fail(error, error_size, "gnutls_certificate_allocate_credentials", rc);
        free(credentials);
        return NULL;
    }
    if (access(ca, R_OK) == 0) {
        rc = gnutls_certificate_set_x509_trust_file(credentials->x509, ca, GNUTLS_X509_FMT_PEM);
        if (rc < 0) {
            snprintf(error, error_size, "cannot load %s: %s", ca, gnutls_strerror(rc));
            goto bad;
        }
    } else if (verify_peer) {
        snprintf(error, error_size, "verifying clients needs %s", ca);
        goto bad;
    }
    rc = gnutls_certificate_set_x509_key_file(credentials->x509, certificate, key, GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
        snprintf(error, error_size, "cannot load %s with %s: %s", certificate, key, gnutls_strerror(rc));
        goto bad;
    }
    return credentials;
bad:
    gnutls_certificate_free_credentials(credentials->x509);
    free(credentials);
    return NULL;
}

/* One client's session and the two threads that move its bytes. */
struct tunnel {
    gnutls_session_t session;
    int network;  /* a dup of the client's socket */
    int plain;    /* our end of the socket pair */
    atomic_int references;
};

static void release(struct tunnel *tunnel) {
    if (atomic_fetch_sub(&tunnel->references, 1) != 1) return;
    gnutls_deinit(tunnel->session);
    close(tunnel->network);
    close(tunnel->plain);
    free(tunnel);
}

/* Large enough that a 1 MiB read reply crosses in few steps. */
enum { PUMP_BUFFER = 1 << 20, PAIR_BUFFER = 4 << 20 };

static int write_all(int fd, const char *data, size_t count) {
    while (count > 0) {
        ssize_t n = send(fd, data, count, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        count -= (size_t)n;
    }
    return 0;
}

/* Client to server: decrypt, then hand the plaintext to the NBD code. */
static void *inbound(void *argument) {
    struct tunnel *tunnel = argument;
    char *buffer = malloc(PUMP_BUFFER);
    while (buffer) {
        ssize_t n = gnutls_record_recv(tunnel->session, buffer, PUMP_BUFFER);
        if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) continue;
        if (n <= 0 || write_all(tunnel->plain, buffer, (size_t)n) < 0) break;
    }
    free(buffer);
    shutdown(tunnel->plain, SHUT_WR);     /* the NBD code sees the client leave */
    shutdown(tunnel->network, SHUT_RD);
    release(tunnel);
    return NULL;
}

/* Server to client: encrypt what the NBD code writes. */
static void *outbound(void *argument) {
    struct tunnel *tunnel = argument;
    char *buffer = malloc(PUMP_BUFFER);
    while (buffer) {
        ssize_t n = recv(tunnel->plain, buffer, PUMP_BUFFER, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        ssize_t sent = 0;
        while (sent < n) {
            ssize_t m = gnutls_record_send(tunnel->session, buffer + sent, (size_t)(n - sent));
            if (m == GNUTLS_E_AGAIN || m == GNUTLS_E_INTERRUPTED) continue;
            if (m < 0) goto done;
            sent += m;
        }
    }
done:
    free(buffer);
    gnutls_bye(tunnel->session, GNUTLS_SHUT_WR);
    shutdown(tunnel->network, SHUT_RDWR); /* wakes the inbound thread */
    shutdown(tunnel->plain, SHUT_RD);
    release(tunnel);
    return NULL;
}

/* Room for whole replies in a plaintext socket pair, so that the NBD writer and the
 * pump trade fewer wake-ups (the kernel caps it at net.core.wmem_max/rmem_max). */
static void widen_pair(int fd) {
    int room = PAIR_BUFFER;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &room, sizeof room);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &room, sizeof room);
}

/* Starts the two threads that carry a session's bytes between `network` and `plain`,
 * which the tunnel then owns; -1 (then the session and both fds are freed). */
static int start_tunnel(gnutls_session_t session, int network, int plain, char *error, size_t error_size) {
    widen_pair(plain);
    struct tunnel *tunnel = calloc(1, sizeof *tunnel);
    if (!tunnel) {
        fail(error, error_size, "calloc", 0);
        gnutls_deinit(session);
        close(network);
        close(plain);
        return -1;
    }
    tunnel->session = session;
    tunnel->network = network;
    tunnel->plain = plain;
    atomic_init(&tunnel->references, 2);
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attributes, 256 << 10);  /* the buffers are on the heap */
    pthread_t thread;
    if (pthread_create(&thread, &attributes, inbound, tunnel) != 0) {
        fail(error, error_size, "pthread_create", 0);
        gnutls_deinit(session);
        close(network);
        close(plain);
        free(tunnel);
        pthread_attr_destroy(&attributes);
        return -1;
    }
    if (pthread_create(&thread, &attributes, outbound, tunnel) != 0) {
        /* The inbound thread holds one reference; end it by closing our side. */
        shutdown(network, SHUT_RDWR);
        release(tunnel);
        pthread_attr_destroy(&attributes);
        fail(error, error_size, "pthread_create", 0);
        return -1;
    }
    pthread_attr_destroy(&attributes);
    return 0;
}

/* A plaintext socket pair: pair[0] for the tunnel, pair[1] for the caller; both widened. */
static int open_pair(int pair[2], char *error, size_t error_size) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) {
        fail(error, error_size, "socketpair", 0);
        return -1;
    }
    widen_pair(pair[1]);
    return 0;
}

static void set_timeouts(int fd, int timeout_ms) {
    struct timeval value = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &value, sizeof value);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, sizeof value);
}

/* The handshake on a dup of `fd` (within `timeout_ms`), then the tunnel to `plain`,
 * which it owns from here on; on failure the session and `plain` are freed and -1
 * returned with `error` filled. */
static int handshake_and_tunnel(gnutls_session_t session, int fd, int plain, int timeout_ms, char *error, size_t error_size) {
    int network = dup(fd);
    if (network < 0) {
        fail(error, error_size, "dup", 0);
        gnutls_deinit(session);
        close(plain);
        return -1;
    }
    gnutls_transport_set_int(session, network);
    set_timeouts(network, timeout_ms);
    int rc;
    do {
        rc = gnutls_handshake(session);
    } while (rc < 0 && !gnutls_error_is_fatal(rc) && rc != GNUTLS_E_AGAIN);
    if (rc < 0) {
        snprintf(error, error_size, "TLS handshake failed: %s", rc == GNUTLS_E_AGAIN ? "timed out" : gnutls_strerror(rc));
        gnutls_deinit(session);
        close(network);
        close(plain);
        return -1;
    }
    set_timeouts(network, 0);
    return start_tunnel(session, network, plain, error, error_size);
}

int iof_tls_accept_into(iof_tls_credentials *credentials, int fd, int plain, int timeout_ms, char *error, size_t error_size) {
    gnutls_session_t session;
    int rc = gnutls_init(&session, GNUTLS_SERVER);
    if (rc < 0) {
        fail(error, error_size, "gnutls_init", rc);
        close(plain);
        return -1;
    }
    gnutls_session_set_ptr(session, credentials);
    if (credentials->is_psk) {
        rc = gnutls_priority_set_direct(session, "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK", NULL);
        if (rc == 0) rc = gnutls_credentials_set(session, GNUTLS_CRD_PSK, credentials->psk);
    } else {
        rc = gnutls_set_default_priority(session);
        if (rc == 0) rc = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, credentials->x509);
        if (rc == 0 && credentials->verify_peer) {
            gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE);
            gnutls_session_set_verify_cert(session, NULL, 0);
        }
    }
    if (rc < 0) {
        fail(error, error_size, "setting up the TLS session", rc);
        gnutls_deinit(session);
        close(plain);
        return -1;
    }
    return handshake_and_tunnel(session, fd, plain, timeout_ms, error, error_size);
}

int iof_tls_accept(iof_tls_credentials *credentials, int fd, int timeout_ms, char *error, size_t error_size) {
    int pair[2];
    if (open_pair(pair, error, error_size) < 0) return -1;
    if (iof_tls_accept_into(credentials, fd, pair[0], timeout_ms, error, error_size) < 0) {
        close(pair[1]);
        return -1;
    }
    return pair[1];
}

int iof_tls_connect_psk(int fd, const char *username, const unsigned char *key, size_t key_size, int timeout_ms,
                        char *error, size_t error_size) {
    gnutls_psk_client_credentials_t credentials;
    int rc = gnutls_psk_allocate_client_credentials(&credentials);
    if (rc < 0) {
        fail(error, error_size, "gnutls_psk_allocate_client_credentials", rc);
        return -1;
    }
    gnutls_datum_t datum = {(unsigned char *)key, (unsigned)key_size};
    rc = gnutls_psk_set_client_credentials(credentials, username, &datum, GNUTLS_PSK_KEY_RAW);
    gnutls_session_t session;
    if (rc == 0) rc = gnutls_init(&session, GNUTLS_CLIENT);
    if (rc < 0) {
        fail(error, error_size, "setting up the TLS client", rc);
        gnutls_psk_free_client_credentials(credentials);
        return -1;
    }
    rc = gnutls_priority_set_direct(session, "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK", NULL);
    if (rc == 0) rc = gnutls_credentials_set(session, GNUTLS_CRD_PSK, credentials);
    if (rc < 0) {
        fail(error, error_size, "setting up the TLS client", rc);
        gnutls_deinit(session);
        gnutls_psk_free_client_credentials(credentials);
        return -1;
    }
    int pair[2];
    if (open_pair(pair, error, error_size) < 0) {
        gnutls_deinit(session);
        gnutls_psk_free_client_credentials(credentials);
        return -1;
    }
    if (handshake_and_tunnel(session, fd, pair[0], timeout_ms, error, error_size) < 0) {
        close(pair[1]);
        gnutls_psk_free_client_credentials(credentials);
        return -1;
    }
    /* The session keeps using the credentials for its life: they live as long as the
     * process (one per target connection; a handful per worker). */
    return pair[1];
}
