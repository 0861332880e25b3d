/* Nettle (GnuTLS's own cryptographic library, already linked for NBD over TLS) gives
 * the trust store its Ed25519 signatures and SHA-256 digests: no second copy of a
 * cryptographic library is compiled into the host. */
#include <nettle/eddsa.h>
#include <nettle/sha2.h>
#include <sys/random.h>
