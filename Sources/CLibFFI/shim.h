#include <ffi.h>

/* libffi's type descriptors are globals and its ABI constant a per-target enum; these
 * helpers hand them to Swift without touching mutable C globals from Swift code. */
static inline ffi_type *iof_ffi_type_void(void) { return &ffi_type_void; }
static inline ffi_type *iof_ffi_type_sint32(void) { return &ffi_type_sint32; }
static inline ffi_type *iof_ffi_type_sint64(void) { return &ffi_type_sint64; }
static inline ffi_type *iof_ffi_type_uint32(void) { return &ffi_type_uint32; }
static inline ffi_type *iof_ffi_type_uint64(void) { return &ffi_type_uint64; }
static inline ffi_type *iof_ffi_type_double(void) { return &ffi_type_double; }
static inline ffi_type *iof_ffi_type_sint(void) { return &ffi_type_sint; }
static inline ffi_type *iof_ffi_type_pointer(void) { return &ffi_type_pointer; }

static inline int iof_ffi_prep_cif(ffi_cif *cif, unsigned nargs, ffi_type *rtype, ffi_type **atypes)
{
    return ffi_prep_cif(cif, FFI_DEFAULT_ABI, nargs, rtype, atypes) == FFI_OK ? 0 : -1;
}
