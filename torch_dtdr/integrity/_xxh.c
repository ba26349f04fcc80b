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

static PyMethodDef methods[] = {
    {"chunk_hashes", py_chunk_hashes, METH_VARARGS, "xxh3_64 of every chunk of a buffer, into out (uint64)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xxh", "torch-dtdr compiled chunk checksums.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__xxh(void) { return PyModule_Create(&module); }
