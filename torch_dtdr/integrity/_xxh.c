/*
 * Chunk checksums of torch-dtdr in one call without the GIL: xxh3_64 (seed 0)
 * of every chunk_size piece of a buffer, from the official xxHash
 * implementation (third_party/xxhash, BSD-2-Clause, compiled in inline).
 *
 * The Python path (integrity/checksum.py with the xxhash package) hashes one
 * chunk per call and takes the GIL back between chunks, which keeps a load's
 * reading threads from running side by side; this module is its fast twin and
 * the tests check that both give the same digests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

/* chunk_hashes(buf, chunk_size, out): out[i] = xxh3_64 of buf[i*chunk_size : (i+1)*chunk_size] */
static PyObject *py_chunk_hashes(PyObject *self, PyObject *args) {
    PyObject *obuf, *oout;
    Py_ssize_t chunk;
    Py_buffer buf, out;
    if (!PyArg_ParseTuple(args, "OnO", &obuf, &chunk, &oout)) return NULL;
    if (chunk <= 0) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
        return NULL;
    }
    if (PyObject_GetBuffer(obuf, &buf, PyBUF_SIMPLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(oout, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    const Py_ssize_t n = buf.len / chunk + (buf.len % chunk ? 1 : 0);
    if (out.len < n * 8) {
        PyErr_Format(PyExc_ValueError, "out: %zd bytes, need %zd", out.len, n * 8);
        PyBuffer_Release(&buf);
        PyBuffer_Release(&out);
        return NULL;
    }
    /* below 256 KiB (about 20 us) the GIL stays held: a hand-off to a waiting thread costs more */
    PyThreadState *released = buf.len >= (1 << 18) ? PyEval_SaveThread() : NULL;
    const unsigned char *p = (const unsigned char *)buf.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len = buf.len - i * chunk < chunk ? buf.len - i * chunk : chunk;
        uint64_t h = XXH3_64bits(p + i * chunk, (size_t)len);
        memcpy((char *)out.buf + 8 * i, &h, 8);
    }
    if (released) PyEval_RestoreThread(released);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(n);
}

/* ISA-L's ec_encode_data(len, k, rows, tables, data pointers, coding pointers). */
typedef void (*ec_encode_fn)(int, int, int, unsigned char *, unsigned char **, unsigned char **);

/* stripe_parity_hashes(buf, chunk_size, k, m, encode_address, tables_address, parity, hashes):
 * for each stripe s of buf (k chunks of chunk_size bytes; len(buf) a whole number of stripes),
 * its m parity chunks into parity[s] (ISA-L's ec_encode_data at encode_address, with the encode
 * tables at tables_address: the caller's own, never values read from a file), then the xxh3_64 of
 * its k data chunks and of its m parity chunks into hashes[s * (k + m) ...], while the stripe is
 * still in cache. One pass over the data instead of one for the parity and one for the
 * checksums, and the GIL released once for the whole run instead of once per stripe. */
static PyObject *py_stripe_parity_hashes(PyObject *self, PyObject *args) {
    PyObject *obuf, *opar, *ohash;
    Py_ssize_t chunk;
    int k, m;
    unsigned long long fn_addr, tables_addr;
    Py_buffer buf, par, hashes;
    if (!PyArg_ParseTuple(args, "OniiKKOO", &obuf, &chunk, &k, &m, &fn_addr, &tables_addr, &opar, &ohash))
        return NULL;
    if (chunk <= 0 || chunk > INT_MAX || k < 1 || m < 1 || k + m > 256 || !fn_addr || !tables_addr) {
        PyErr_SetString(PyExc_ValueError, "bad chunk size, k, m or addresses");
        return NULL;
    }
    if (PyObject_GetBuffer(obuf, &buf, PyBUF_SIMPLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(opar, &par, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (PyObject_GetBuffer(ohash, &hashes, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&par);
        return NULL;
    }
    const Py_ssize_t span = (Py_ssize_t)k * chunk, stripes = buf.len / span;
    if (buf.len % span || par.len < stripes * m * chunk || hashes.len < stripes * (k + m) * 8) {
        PyErr_Format(PyExc_ValueError, "buffers of %zd, %zd and %zd bytes do not fit %zd stripes of %d + %d chunks of %zd bytes",
                     buf.len, par.len, hashes.len, stripes, k, m, chunk);
        PyBuffer_Release(&buf);
        PyBuffer_Release(&par);
        PyBuffer_Release(&hashes);
        return NULL;
    }
    ec_encode_fn encode = (ec_encode_fn)(uintptr_t)fn_addr;
    unsigned char *tables = (unsigned char *)(uintptr_t)tables_addr;
    unsigned char *data_ptrs[256], *coding_ptrs[256];
    PyThreadState *released = buf.len >= (1 << 18) ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t s = 0; s < stripes; s++) {
        unsigned char *data = (unsigned char *)buf.buf + s * span;
        unsigned char *coding = (unsigned char *)par.buf + s * m * chunk;
        for (int i = 0; i < k; i++) data_ptrs[i] = data + i * chunk;
        for (int i = 0; i < m; i++) coding_ptrs[i] = coding + i * chunk;
        encode((int)chunk, k, m, tables, data_ptrs, coding_ptrs);
        char *h = (char *)hashes.buf + s * (k + m) * 8;
        for (int i = 0; i < k + m; i++) {
            uint64_t v = XXH3_64bits(i < k ? data_ptrs[i] : coding_ptrs[i - k], (size_t)chunk);
            memcpy(h + 8 * i, &v, 8);
        }
    }
    if (released) PyEval_RestoreThread(released);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&par);
    PyBuffer_Release(&hashes);
    return PyLong_FromSsize_t(stripes);
}

static PyMethodDef methods[] = {
    {"chunk_hashes", py_chunk_hashes, METH_VARARGS, "xxh3_64 of every chunk of a buffer, into out (uint64)."},
    {"stripe_parity_hashes", py_stripe_parity_hashes, METH_VARARGS,
     "Parity (ISA-L, by address) and chunk checksums of whole stripes in one pass."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xxh", "torch-dtdr compiled chunk checksums.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__xxh(void) { return PyModule_Create(&module); }
