/* Optional C versions of segq's record framing hot paths.
 *
 * Each function here does exactly what its pure-Python twin in _format.py
 * does, byte for byte (tests/test_speedups.py checks that on random input);
 * segq works without this module (set SEGQ_PURE_PYTHON=1 to see).  It exists
 * because a small record's send in pure Python is bounded by three
 * interpreter-level operations -- a slice copy, zlib.crc32 and struct.pack --
 * that together cost more than the rest of the send; here they are one call.
 *
 * The record layout (docs/format.md): u32 le length word, u32 le CRC-32 of
 * the four length bytes followed by the payload, then the payload.  A record
 * with headers stores the CRC complemented; its payload (header block, then
 * data) crosses into Python as an instance of segq._headers.Framed, a bytes
 * subclass registered here by _format at import (set_framed_type).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HEADER_SIZE 8
#define LENGTH_MASK 0x7FFFFFFFu
#define CONTINUES 0x80000000u
#define HEADED_CRC 0xFFFFFFFFu

static PyObject *framed_type = NULL; /* segq._headers.Framed */

/* A new Framed holding size bytes at p (a record body with headers). */
static PyObject *new_framed(const unsigned char *p, Py_ssize_t size) {
    if (framed_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "segq._speedups: set_framed_type was not called");
        return NULL;
    }
    PyObject *view = PyMemoryView_FromMemory((char *)p, size, PyBUF_READ);
    if (view == NULL)
        return NULL;
    PyObject *result = PyObject_CallOneArg(framed_type, view);
    Py_DECREF(view);
    return result;
}

/* CRC-32 (ISO-HDLC, as zlib), slicing by eight. */
static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int t = 1; t < 8; t++) {
            c = crc_table[0][c & 0xFF] ^ (c >> 8);
            crc_table[t][n] = c;
        }
    }
}

/* The raw CRC register (no pre- or post-inversion) after n more bytes, by table. */
static uint32_t crc_raw_table(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint32_t lo = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        lo ^= crc;
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
              crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
              crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_CLMUL_PATH 1
static int use_clmul;

/* Folding with carry-less multiplication (PCLMULQDQ), for runs of 64 bytes
 * or more: a 4 KiB record's CRC costs about a tenth of the table's.  Four
 * 128-bit lanes are folded 64 bytes at a time, then into one lane; the
 * constants are x^(k) mod P for the bit-reflected CRC-32 polynomial at the
 * fold distances (512 +- 32 bits, 128 +- 32 bits).  Folding keeps the CRC of
 * "lane bytes" equal to the CRC of everything consumed so far, so the last
 * 16 bytes of lane and the tail past the last full block go through the
 * table: no Barrett reduction to get wrong.
 */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_raw_clmul(uint32_t crc, const unsigned char *p,
                                                                        size_t n) {
    const __m128i fold4 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i fold1 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    __m128i x0 = _mm_loadu_si128((const __m128i *)p);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)crc));
    p += 64;
    n -= 64;
#define FOLD(x, k, data) \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128((x), (k), 0x00), _mm_clmulepi64_si128((x), (k), 0x11)), (data))
    while (n >= 64) {
        x0 = FOLD(x0, fold4, _mm_loadu_si128((const __m128i *)p));
        x1 = FOLD(x1, fold4, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = FOLD(x2, fold4, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = FOLD(x3, fold4, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x0 = FOLD(x0, fold1, x1);
    x0 = FOLD(x0, fold1, x2);
    x0 = FOLD(x0, fold1, x3);
    while (n >= 16) {
        x0 = FOLD(x0, fold1, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
#undef FOLD
    unsigned char lane[16];
    _mm_storeu_si128((__m128i *)lane, x0);
    return crc_raw_table(crc_raw_table(0, lane, 16), p, n);
}
#endif

static uint32_t crc_update(uint32_t crc, const unsigned char *p, size_t n) {
#ifdef HAVE_CLMUL_PATH
    if (n >= 64 && use_clmul)
        return ~crc_raw_clmul(~crc, p, n);
#endif
    return ~crc_raw_table(~crc, p, n);
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t record_crc(uint32_t length_word, const unsigned char *payload, size_t size) {
    unsigned char length[4];
    put_u32(length, length_word);
    return crc_update(crc_update(0, length, 4), payload, size);
}

/* Set a TypeError and return 1 unless a function got its expected number of arguments. */
static int wrong_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char *usage) {
    if (nargs == expected)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", usage, expected);
    return 1;
}

/* Read an integer argument into *out; return 0 with the exception set if it is not one. */
static int ssize_arg(PyObject *object, Py_ssize_t *out) {
    *out = PyLong_AsSsize_t(object);
    return !(*out == -1 && PyErr_Occurred());
}

static int long_long_arg(PyObject *object, long long *out) {
    *out = PyLong_AsLongLong(object);
    return !(*out == -1 && PyErr_Occurred());
}

/* frame_into(target, offset, payload): write payload at offset + 8, then its header at offset. */
static PyObject *frame_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 3, "frame_into(target, offset, payload)"))
        return NULL;
    Py_ssize_t offset;
    if (!ssize_arg(args[1], &offset))
        return NULL;
    Py_buffer target, payload;
    if (PyObject_GetBuffer(args[0], &target, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &payload, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&target);
        return NULL;
    }
    PyObject *result = NULL;
    if (offset < 0 || payload.len > (Py_ssize_t)LENGTH_MASK || offset > target.len - HEADER_SIZE - payload.len) {
        PyErr_SetString(PyExc_ValueError, "record does not fit in the target buffer");
    } else {
        unsigned char *at = (unsigned char *)target.buf + offset;
        uint32_t length_word = (uint32_t)payload.len;
        uint32_t flip = (PyObject *)Py_TYPE(args[2]) == framed_type ? HEADED_CRC : 0;
        memcpy(at + HEADER_SIZE, payload.buf, (size_t)payload.len);
        put_u32(at + 4, record_crc(length_word, payload.buf, (size_t)payload.len) ^ flip);
        put_u32(at, length_word);
        result = PyLong_FromSsize_t(offset + HEADER_SIZE + payload.len);
    }
    PyBuffer_Release(&payload);
    PyBuffer_Release(&target);
    return result;
}

/* Tell whether an intact record starts at offset of base[0:len]: 0 if not (cut short, an end
 * marker, a checksum that fails, an offset outside), 1 for a plain record, 2 for a record with
 * headers (its CRC stored complemented); *size is its payload size.  The one record check of
 * read_record, decode_run and decode_messages.
 */
static inline int intact_record(const unsigned char *base, Py_ssize_t len, Py_ssize_t offset, Py_ssize_t *size) {
    if (offset < 0 || offset > len - HEADER_SIZE)
        return 0;
    const unsigned char *at = base + offset;
    uint32_t length_word = get_u32(at);
    *size = (Py_ssize_t)(length_word & LENGTH_MASK);
    if (length_word == 0xFFFFFFFFu || *size > len - HEADER_SIZE - offset)
        return 0;
    uint32_t crc = record_crc(length_word, at + HEADER_SIZE, (size_t)*size);
    uint32_t stored = get_u32(at + 4);
    return crc == stored ? 1 : (crc ^ HEADED_CRC) == stored ? 2 : 0;
}

/* The payload of the intact record at at, of intact_record's kind: bytes, or a Framed (kind 2). */
static inline PyObject *record_payload(const unsigned char *at, Py_ssize_t size, int kind) {
    if (kind == 2)
        return new_framed(at + HEADER_SIZE, size);
    return PyBytes_FromStringAndSize((const char *)at + HEADER_SIZE, size);
}

/* read_record(buffer, offset): the payload of the intact record at offset, or None.
 *
 * The payload of a record with headers comes back as a Framed.
 * None means "not here in full, or the checksum fails, or an end marker":
 * the caller's slow path decides which.
 */
static PyObject *read_record(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 2, "read_record(buffer, offset)"))
        return NULL;
    Py_ssize_t offset;
    if (!ssize_arg(args[1], &offset))
        return NULL;
    Py_buffer buffer;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *base = (const unsigned char *)buffer.buf;
    Py_ssize_t size;
    int kind = intact_record(base, buffer.len, offset, &size);
    PyObject *result = kind ? record_payload(base + offset, size, kind) : Py_NewRef(Py_None);
    PyBuffer_Release(&buffer);
    return result;
}

/* Frame the count bytes objects of list at at (sized by the caller): the
 * one framing loop of encode_batch and frame_batch.  All but the last record
 * CONTINUE; a bytes subclass (a Framed body) is a record with headers, whose
 * CRC is stored complemented.
 */
static void frame_list(unsigned char *at, PyObject *list, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        uint32_t length_word = (uint32_t)size | (i < count - 1 ? CONTINUES : 0);
        uint32_t flip = PyBytes_CheckExact(item) ? 0 : HEADED_CRC;
        const unsigned char *payload = (const unsigned char *)PyBytes_AS_STRING(item);
        put_u32(at, length_word);
        put_u32(at + 4, record_crc(length_word, payload, (size_t)size) ^ flip);
        memcpy(at + HEADER_SIZE, payload, (size_t)size);
        at += HEADER_SIZE + size;
    }
}

/* Return a new bytes object of total bytes holding the count records of list, framed. */
static PyObject *framed_blob(PyObject *list, Py_ssize_t count, Py_ssize_t total) {
    PyObject *blob = PyBytes_FromStringAndSize(NULL, total);
    if (blob != NULL)
        frame_list((unsigned char *)PyBytes_AS_STRING(blob), list, count);
    return blob;
}

/* encode_batch(payloads): frame a list of bytes; all but the last CONTINUE.
 *
 * An item that is a bytes subclass (a Framed body) is a record with headers.
 */
static PyObject *encode_batch(PyObject *module, PyObject *payloads) {
    if (!PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "encode_batch takes a list");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(payloads), total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(payloads, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "encode_batch takes a list of bytes");
            return NULL;
        }
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        if (size > (Py_ssize_t)LENGTH_MASK || total > PY_SSIZE_T_MAX - HEADER_SIZE - size) {
            PyErr_SetString(PyExc_OverflowError, "batch too large");
            return NULL;
        }
        total += HEADER_SIZE + size;
    }
    return framed_blob(payloads, count, total);
}

/* frame_batch(records, limit): validate and frame a list of bytes in one pass.
 *
 * Returns the framed bytes, every record but the last marked CONTINUES, as
 * encode_batch does; or, framing nothing, the size of the first record over
 * limit (an int); or None if an item is not exactly bytes (the caller
 * converts the items and calls again).  One pass instead of a Python type
 * check, a Python length check and then encode_batch: at 100 records of
 * 100 B those two loops cost more than the framing.
 */
static PyObject *frame_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 2, "frame_batch(records, limit)"))
        return NULL;
    PyObject *records = args[0];
    if (!PyList_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "frame_batch takes a list");
        return NULL;
    }
    Py_ssize_t limit;
    if (!ssize_arg(args[1], &limit))
        return NULL;
    if (limit > (Py_ssize_t)LENGTH_MASK)
        limit = (Py_ssize_t)LENGTH_MASK;
    Py_ssize_t count = PyList_GET_SIZE(records), total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(records, i);
        if (!PyBytes_CheckExact(item))
            Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t size = PyBytes_GET_SIZE(PyList_GET_ITEM(records, i));
        if (size > limit)
            return PyLong_FromSsize_t(size);
        if (total > PY_SSIZE_T_MAX - HEADER_SIZE - size) {
            PyErr_SetString(PyExc_OverflowError, "batch too large");
            return NULL;
        }
        total += HEADER_SIZE + size;
    }
    return framed_blob(records, count, total);
}

/* decode_run(buffer, offset, max_count): payloads of up to max_count intact records from offset.
 *
 * Returns (payloads, next_offset); stops early, without error, at anything
 * that is not an intact record (an end marker, a short record, a checksum
 * mismatch) so the caller's slow path can look at it.
 */
static PyObject *decode_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 3, "decode_run(buffer, offset, max_count)"))
        return NULL;
    Py_ssize_t offset;
    if (!ssize_arg(args[1], &offset))
        return NULL;
    Py_ssize_t max_count;
    if (!ssize_arg(args[2], &max_count))
        return NULL;
    Py_buffer buffer;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *payloads = PyList_New(0);
    if (payloads == NULL) {
        PyBuffer_Release(&buffer);
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)buffer.buf;
    Py_ssize_t size;
    int kind;
    while (PyList_GET_SIZE(payloads) < max_count && (kind = intact_record(base, buffer.len, offset, &size))) {
        PyObject *payload = record_payload(base + offset, size, kind);
        if (payload == NULL || PyList_Append(payloads, payload) < 0) {
            Py_XDECREF(payload);
            Py_DECREF(payloads);
            PyBuffer_Release(&buffer);
            return NULL;
        }
        Py_DECREF(payload);
        offset += HEADER_SIZE + size;
    }
    PyBuffer_Release(&buffer);
    PyObject *result = Py_BuildValue("(Nn)", payloads, offset);
    return result;
}

/* Received messages (segq.receiver.Message's base): five fields and nothing else.
 *
 * recv_batch of 100-byte records spent most of its time running a Python
 * __init__ per message; built here, a message costs an allocation and five
 * stores.  The Python twin is segq._messages._PyMessageFields; the subclass
 * in segq.receiver adds the methods.  "_headers" is unset (AttributeError)
 * for a record without headers; "_start"/"_end" are position words.
 */
typedef struct {
    PyObject_HEAD
    PyObject *data;
    PyObject *headers;
    PyObject *owner;
    long long start;
    long long end;
} MessageObject;

static int message_traverse(MessageObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->data);
    Py_VISIT(self->headers);
    Py_VISIT(self->owner);
    return 0;
}

static int message_clear(MessageObject *self) {
    Py_CLEAR(self->data);
    Py_CLEAR(self->headers);
    Py_CLEAR(self->owner);
    return 0;
}

static void message_dealloc(MessageObject *self) {
    PyObject_GC_UnTrack(self);
    message_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef message_members[] = {
    {"data", T_OBJECT_EX, offsetof(MessageObject, data), 0, NULL},
    {"_headers", T_OBJECT_EX, offsetof(MessageObject, headers), 0, NULL},
    {"_receiver", T_OBJECT_EX, offsetof(MessageObject, owner), 0, NULL},
    {"_start", T_LONGLONG, offsetof(MessageObject, start), 0, NULL},
    {"_end", T_LONGLONG, offsetof(MessageObject, end), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject MessageFieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "segq._speedups.MessageFields",
    .tp_basicsize = sizeof(MessageObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The fields of a received message (segq.receiver.Message adds the methods).",
    .tp_traverse = (traverseproc)message_traverse,
    .tp_clear = (inquiry)message_clear,
    .tp_dealloc = (destructor)message_dealloc,
    .tp_members = message_members,
};

/* A new message of type cls (a subclass of MessageFields); steals no reference. */
static PyObject *make_message(PyTypeObject *cls, PyObject *owner, PyObject *data, long long start, long long end) {
    MessageObject *message = (MessageObject *)cls->tp_alloc(cls, 0);
    if (message == NULL)
        return NULL;
    Py_INCREF(data);
    message->data = data;
    Py_INCREF(owner);
    message->owner = owner;
    message->start = start;
    message->end = end;
    return (PyObject *)message;
}

static PyTypeObject *message_class(PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &MessageFieldsType)) {
        PyErr_SetString(PyExc_TypeError, "the message class must subclass segq._speedups.MessageFields");
        return NULL;
    }
    return (PyTypeObject *)cls;
}

/* new_message(cls, owner, data, start, end): a message, its fields set (no header parsing). */
static PyObject *new_message(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 5, "new_message(cls, owner, data, start, end)"))
        return NULL;
    PyTypeObject *cls = message_class(args[0]);
    if (cls == NULL)
        return NULL;
    long long start;
    if (!long_long_arg(args[3], &start))
        return NULL;
    long long end;
    if (!long_long_arg(args[4], &end))
        return NULL;
    return make_message(cls, args[1], args[2], start, end);
}

/* decode_messages(buffer, offset, max_count, cls, owner, base_word): messages of up to max_count intact records.
 *
 * decode_run's walk, building a message of type cls per record (owner its
 * _receiver; _start/_end the position words base_word + offset of its start
 * and end).  Returns (messages, next_offset, framed): framed counts the
 * messages whose data is a Framed body (a record with headers), left for the
 * caller to split.
 */
static PyObject *decode_messages(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 6, "decode_messages(buffer, offset, max_count, cls, owner, base_word)"))
        return NULL;
    Py_ssize_t offset;
    if (!ssize_arg(args[1], &offset))
        return NULL;
    Py_ssize_t max_count;
    if (!ssize_arg(args[2], &max_count))
        return NULL;
    PyTypeObject *cls = message_class(args[3]);
    if (cls == NULL)
        return NULL;
    PyObject *owner = args[4];
    long long base_word;
    if (!long_long_arg(args[5], &base_word))
        return NULL;
    Py_buffer buffer;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t framed = 0;
    PyObject *messages = PyList_New(0);
    if (messages == NULL) {
        PyBuffer_Release(&buffer);
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)buffer.buf;
    Py_ssize_t size;
    int kind;
    while (PyList_GET_SIZE(messages) < max_count && (kind = intact_record(base, buffer.len, offset, &size))) {
        PyObject *payload = record_payload(base + offset, size, kind);
        framed += kind == 2;
        PyObject *message = NULL;
        if (payload != NULL) {
            long long start = base_word + offset;
            message = make_message(cls, owner, payload, start, start + HEADER_SIZE + size);
            Py_DECREF(payload);
        }
        if (message == NULL || PyList_Append(messages, message) < 0) {
            Py_XDECREF(message);
            Py_DECREF(messages);
            PyBuffer_Release(&buffer);
            return NULL;
        }
        Py_DECREF(message);
        offset += HEADER_SIZE + size;
    }
    PyBuffer_Release(&buffer);
    return Py_BuildValue("(Nnn)", messages, offset, framed);
}

/* write_slot(target, base, sequence, segment, offset): a cursor slot's three words, then its CRC.
 *
 * The slot's first 16 bytes (magic, version, reserved) are already there;
 * this stores the u64 le sequence, segment and offset at base + 16, + 24,
 * + 32 and the u32 le CRC-32 of the slot's first 40 bytes at base + 40, as
 * segq._state does with a memoryview, in one call instead of five.
 */
static PyObject *write_slot(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 5, "write_slot(target, base, sequence, segment, offset)"))
        return NULL;
    Py_ssize_t at;
    if (!ssize_arg(args[1], &at))
        return NULL;
    unsigned long long words[3];
    for (int i = 0; i < 3; i++) {
        words[i] = PyLong_AsUnsignedLongLong(args[2 + i]);
        if (words[i] == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }
    Py_buffer target;
    if (PyObject_GetBuffer(args[0], &target, PyBUF_WRITABLE) < 0)
        return NULL;
    if (at < 0 || at > target.len - 44) {
        PyBuffer_Release(&target);
        PyErr_SetString(PyExc_ValueError, "write_slot: the slot does not fit in the target");
        return NULL;
    }
    unsigned char *slot = (unsigned char *)target.buf + at;
    for (int i = 0; i < 3; i++) {
        put_u32(slot + 16 + 8 * i, (uint32_t)words[i]);
        put_u32(slot + 20 + 8 * i, (uint32_t)(words[i] >> 32));
    }
    put_u32(slot + 40, crc_update(0, slot, 40));
    PyBuffer_Release(&target);
    Py_RETURN_NONE;
}

/* mutex_lock(view) / mutex_timedlock(view, seconds) / mutex_unlock(view): the mutex at the start of a buffer.
 *
 * The work-queue group lock (segq/workqueue/_grouplock.py) is a robust,
 * process-shared pthread mutex in a memory-mapped file; called through
 * ctypes, a lock+unlock pair cost ~430 ns here, most of it ctypes' argument
 * conversion, and a claim+ack runs two pairs.  Here a free mutex is taken
 * without releasing the GIL (trylock); only a busy one is waited for, with
 * the GIL released, and for a bounded time: mutex_lock waits up to
 * FIRST_WAIT, then returns ETIMEDOUT, and the caller goes on with
 * mutex_timedlock in slices of the same length up to SEGQ_LOCK_TIMEOUT
 * (segq._flock.wait_lock), running signal handlers between them.  A
 * release wakes the waiter at once, whatever the slice; shorter slices cost
 * throughput: with 0.5 ms, four workers claimed+acked 18 % fewer records
 * than with an untimed lock (a timer armed for nearly every contended
 * wait), with 50 ms as many.  All return pthread's result (0, or an errno
 * such as EOWNERDEAD, which the caller handles), as the ctypes calls do.
 *
 * The wait is measured on CLOCK_MONOTONIC where the C library has
 * pthread_mutex_clocklock (glibc 2.30), else on CLOCK_REALTIME, whose jumps
 * can then stretch or cut one slice only.  Robust mutexes are used on Linux
 * only, so this is built there only.
 */
#ifdef __linux__
#include <pthread.h>
#include <errno.h>
#include <time.h>

#define FIRST_WAIT 0.05 /* seconds; segq/workqueue/_grouplock.py's _SLICE */

#if defined(__GLIBC__) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 30)
#define HAVE_MUTEX_CLOCKLOCK 1
#endif
#endif

static pthread_mutex_t *mutex_in(PyObject *view, Py_buffer *buffer) {
    if (PyObject_GetBuffer(view, buffer, PyBUF_WRITABLE) < 0)
        return NULL;
    if (buffer->len < (Py_ssize_t)sizeof(pthread_mutex_t)) {
        PyBuffer_Release(buffer);
        PyErr_SetString(PyExc_ValueError, "the buffer is too small to hold a pthread mutex");
        return NULL;
    }
    return (pthread_mutex_t *)buffer->buf;
}

/* Lock the mutex, waiting at most `seconds`; call with the GIL released. */
static int mutex_wait(pthread_mutex_t *mutex, double seconds) {
    struct timespec deadline;
#ifdef HAVE_MUTEX_CLOCKLOCK
    clock_gettime(CLOCK_MONOTONIC, &deadline);
#else
    clock_gettime(CLOCK_REALTIME, &deadline);
#endif
    long long nanoseconds = deadline.tv_nsec + (long long)(seconds * 1e9);
    deadline.tv_sec += (time_t)(nanoseconds / 1000000000);
    deadline.tv_nsec = (long)(nanoseconds % 1000000000);
#ifdef HAVE_MUTEX_CLOCKLOCK
    return pthread_mutex_clocklock(mutex, CLOCK_MONOTONIC, &deadline);
#else
    return pthread_mutex_timedlock(mutex, &deadline);
#endif
}

static PyObject *mutex_lock(PyObject *module, PyObject *view) {
    Py_buffer buffer;
    pthread_mutex_t *mutex = mutex_in(view, &buffer);
    if (mutex == NULL)
        return NULL;
    int result = pthread_mutex_trylock(mutex);
    if (result == EBUSY) {
        Py_BEGIN_ALLOW_THREADS
        result = mutex_wait(mutex, FIRST_WAIT);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&buffer);
    return PyLong_FromLong(result);
}

static PyObject *mutex_timedlock(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 2, "mutex_timedlock(view, seconds)"))
        return NULL;
    double seconds = PyFloat_AsDouble(args[1]);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(seconds >= 0 && seconds <= 86400)) {
        PyErr_SetString(PyExc_ValueError, "mutex_timedlock: seconds must be from 0 to 86400");
        return NULL;
    }
    Py_buffer buffer;
    pthread_mutex_t *mutex = mutex_in(args[0], &buffer);
    if (mutex == NULL)
        return NULL;
    int result;
    Py_BEGIN_ALLOW_THREADS
    result = mutex_wait(mutex, seconds);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buffer);
    return PyLong_FromLong(result);
}

static PyObject *mutex_unlock(PyObject *module, PyObject *view) {
    Py_buffer buffer;
    pthread_mutex_t *mutex = mutex_in(view, &buffer);
    if (mutex == NULL)
        return NULL;
    int result = pthread_mutex_unlock(mutex);
    PyBuffer_Release(&buffer);
    return PyLong_FromLong(result);
}
#endif

static PyObject *crc32(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32(data, value=0) takes 1 or 2 arguments");
        return NULL;
    }
    uint32_t value = 0;
    if (nargs == 2) {
        value = (uint32_t)PyLong_AsUnsignedLongMask(args[1]);
        if (PyErr_Occurred())
            return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    value = crc_update(value, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(value);
}

/* encode_headers(headers, allow_reserved): the header block of a dict, or None.
 *
 * Only the common case is handled here: a dict of non-empty str keys (no NUL,
 * encodable, not reserved unless allowed) to bytes or str values.  Anything
 * else returns None and the Python twin in _headers.py raises the error that
 * names the problem, so both agree on every input they both accept.
 */
static PyObject *encode_headers(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 2, "encode_headers(headers, allow_reserved)"))
        return NULL;
    PyObject *headers = args[0];
    int allow_reserved = PyObject_IsTrue(args[1]);
    if (allow_reserved < 0)
        return NULL;
    if (!PyDict_CheckExact(headers))
        Py_RETURN_NONE;
    Py_ssize_t total = 4, pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(headers, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key))
            Py_RETURN_NONE;
        Py_ssize_t key_size;
        const char *name = PyUnicode_AsUTF8AndSize(key, &key_size);
        if (name == NULL) {
            PyErr_Clear(); /* a lone surrogate: the twin says so */
            Py_RETURN_NONE;
        }
        if (key_size == 0 || key_size > 0xFFFF || memchr(name, 0, (size_t)key_size) != NULL ||
            (!allow_reserved && key_size >= 5 && memcmp(name, "segq-", 5) == 0))
            Py_RETURN_NONE;
        Py_ssize_t value_size;
        if (PyBytes_CheckExact(value)) {
            value_size = PyBytes_GET_SIZE(value);
        } else if (PyUnicode_CheckExact(value)) {
            if (PyUnicode_AsUTF8AndSize(value, &value_size) == NULL) {
                PyErr_Clear();
                Py_RETURN_NONE;
            }
        } else {
            Py_RETURN_NONE;
        }
        if (value_size > (Py_ssize_t)LENGTH_MASK || total > PY_SSIZE_T_MAX / 2 - 6 - key_size - value_size)
            Py_RETURN_NONE;
        total += 6 + key_size + value_size;
    }
    if (total - 4 > (Py_ssize_t)0xFFFFFFFFu)
        Py_RETURN_NONE;
    PyObject *block = PyBytes_FromStringAndSize(NULL, total);
    if (block == NULL)
        return NULL;
    unsigned char *at = (unsigned char *)PyBytes_AS_STRING(block);
    put_u32(at, (uint32_t)(total - 4));
    at += 4;
    pos = 0;
    while (PyDict_Next(headers, &pos, &key, &value)) {
        Py_ssize_t key_size, value_size;
        const char *name = PyUnicode_AsUTF8AndSize(key, &key_size); /* cached by the first pass */
        const char *raw = PyBytes_CheckExact(value) ? PyBytes_AS_STRING(value)
                                                     : PyUnicode_AsUTF8AndSize(value, &value_size);
        if (PyBytes_CheckExact(value))
            value_size = PyBytes_GET_SIZE(value);
        at[0] = (unsigned char)key_size;
        at[1] = (unsigned char)(key_size >> 8);
        memcpy(at + 2, name, (size_t)key_size);
        at += 2 + key_size;
        put_u32(at, (uint32_t)value_size);
        memcpy(at + 4, raw, (size_t)value_size);
        at += 4 + value_size;
    }
    return block;
}

/* split_body(body): (data, headers) of a record body with headers, or None if the block does not parse. */
static PyObject *split_body(PyObject *module, PyObject *body) {
    Py_buffer buffer;
    if (PyObject_GetBuffer(body, &buffer, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *base = (const unsigned char *)buffer.buf;
    Py_ssize_t size = buffer.len, at = 4, end;
    PyObject *headers = NULL, *result = NULL;
    if (size < 4 || (Py_ssize_t)get_u32(base) > size - 4)
        goto malformed;
    end = 4 + (Py_ssize_t)get_u32(base);
    headers = PyDict_New();
    if (headers == NULL)
        goto done;
    while (at < end) {
        if (end - at < 2)
            goto malformed;
        Py_ssize_t key_size = (Py_ssize_t)(base[at] | base[at + 1] << 8);
        at += 2;
        if (key_size == 0 || end - at < key_size + 4 || memchr(base + at, 0, (size_t)key_size) != NULL)
            goto malformed;
        PyObject *key = PyUnicode_DecodeUTF8((const char *)base + at, key_size, "strict");
        if (key == NULL) {
            PyErr_Clear();
            goto malformed;
        }
        at += key_size;
        Py_ssize_t value_size = (Py_ssize_t)get_u32(base + at);
        at += 4;
        int seen = PyDict_Contains(headers, key);
        if (seen != 0 || value_size > end - at) {
            Py_DECREF(key);
            if (seen < 0)
                goto done;
            goto malformed;
        }
        PyObject *value = PyBytes_FromStringAndSize((const char *)base + at, value_size);
        if (value == NULL || PyDict_SetItem(headers, key, value) < 0) {
            Py_DECREF(key);
            Py_XDECREF(value);
            goto done;
        }
        Py_DECREF(key);
        Py_DECREF(value);
        at += value_size;
    }
    {
        PyObject *data = PyBytes_FromStringAndSize((const char *)base + end, size - end);
        if (data != NULL)
            result = PyTuple_Pack(2, data, headers);
        Py_XDECREF(data);
    }
    goto done;
malformed:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(headers);
    PyBuffer_Release(&buffer);
    return result;
}

static PyObject *set_framed_type(PyObject *module, PyObject *type) {
    if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, &PyBytes_Type)) {
        PyErr_SetString(PyExc_TypeError, "set_framed_type takes a bytes subclass");
        return NULL;
    }
    Py_INCREF(type);
    Py_XSETREF(framed_type, type);
    Py_RETURN_NONE;
}

#if !defined(_WIN32)
#define HAVE_APPENDER 1
#include <semaphore.h>
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

/* Appender: the whole append of one small plain record, for Sender.send.
 *
 * It does what the Python hot path of Sender.send does, in the same order:
 * take the append semaphore without waiting, read the tail word, name this
 * process in the owner word when someone else appended since our last send,
 * check that the record fits in the mapped window, frame it there (payload,
 * then header) or, from pwrite_from bytes on, write header and payload with
 * one pwritev (as Sender._pwrite_framed does with one pwrite: the same page
 * cache without a write fault per new page), publish the new tail, release
 * the semaphore; it returns 0
 * whenever anything is not plain ("fall back to the Python path", which then
 * does it all itself), 1 when the record is sent, 2 when sent and a receiver
 * waits for data.  The Sender keeps this object's window in step with its own
 * (show/hide around every remap, close before it closes anything): the maps
 * are held as buffer exports, so a map can never be closed under it, and the
 * call runs under the GIL from start to end, so no other thread of this
 * process can change the Sender's state in the middle of it.
 *
 * The semaphore is taken and released here with sem_trywait/sem_post, so
 * SemLock's own count (kept for its Python acquire/release) is untouched.
 */
typedef struct {
    PyObject_HEAD
    sem_t *sem;
    Py_buffer control;
    Py_buffer segment;
    int has_control, has_segment;
    Py_ssize_t tail_index, owner_index, waiting_offset;
    unsigned long long pid;
    unsigned long long base_word, limit_word, last_word;
    int fd;                 /* the shown segment's file */
    long long base_offset;  /* its file offset at base_word */
    Py_ssize_t pwrite_from; /* payloads this large or more go by pwritev */
    Py_ssize_t size_limit; /* largest payload sent here; -1: none (every send falls back) */
} AppenderObject;

static void appender_hide_segment(AppenderObject *self) {
    if (self->has_segment) {
        PyBuffer_Release(&self->segment);
        self->has_segment = 0;
    }
    self->base_word = 0;
    self->limit_word = 0;
    self->fd = -1;
}

static void appender_release(AppenderObject *self) {
    appender_hide_segment(self);
    if (self->has_control) {
        PyBuffer_Release(&self->control);
        self->has_control = 0;
    }
    self->sem = NULL;
    self->size_limit = -1;
}

static void appender_dealloc(AppenderObject *self) {
    appender_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Appender(semaphore_handle, control_map, tail_index, owner_index, waiting_offset, pid, pwrite_from, size_limit) */
static int appender_init(AppenderObject *self, PyObject *args, PyObject *kwargs) {
    PyObject *handle, *control;
    Py_ssize_t tail_index, owner_index, waiting_offset, pwrite_from, size_limit;
    unsigned long long pid;
    if (!PyArg_ParseTuple(args, "OOnnnKnn:Appender", &handle, &control, &tail_index, &owner_index, &waiting_offset,
                          &pid, &pwrite_from, &size_limit))
        return -1;
    appender_release(self);
    void *sem = PyLong_AsVoidPtr(handle);
    if (sem == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "no semaphore");
        return -1;
    }
    if (PyObject_GetBuffer(control, &self->control, PyBUF_WRITABLE) < 0)
        return -1;
    self->has_control = 1;
    Py_ssize_t words = self->control.len / 8;
    if (((uintptr_t)self->control.buf & 7) || tail_index < 0 || tail_index >= words || owner_index < 0 ||
        owner_index >= words || waiting_offset < 0 || waiting_offset >= self->control.len) {
        appender_release(self);
        PyErr_SetString(PyExc_ValueError, "control word out of the map");
        return -1;
    }
    self->sem = (sem_t *)sem;
    self->tail_index = tail_index;
    self->owner_index = owner_index;
    self->waiting_offset = waiting_offset;
    self->pid = pid;
    self->pwrite_from = pwrite_from;
    self->size_limit = size_limit;
    return 0;
}

/* show(segment_map, base_word, limit_word, fd, base_offset): append into this map (file fd from base_offset), which starts at base_word. */
static PyObject *appender_show(AppenderObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (wrong_nargs(nargs, 5, "show(segment_map, base_word, limit_word, fd, base_offset)"))
        return NULL;
    unsigned long long base = PyLong_AsUnsignedLongLong(args[1]);
    if (base == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long limit = PyLong_AsUnsignedLongLong(args[2]);
    if (limit == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long long fd, base_offset;
    if (!long_long_arg(args[3], &fd) || !long_long_arg(args[4], &base_offset))
        return NULL;
    if (fd < 0 || fd > INT32_MAX || base_offset < 0) {
        PyErr_SetString(PyExc_ValueError, "bad segment file or offset");
        return NULL;
    }
    if (!self->has_control) { /* closed: a segment alone must never make send take the semaphore */
        PyErr_SetString(PyExc_ValueError, "show() on a closed Appender");
        return NULL;
    }
    appender_hide_segment(self);
    if (PyObject_GetBuffer(args[0], &self->segment, PyBUF_WRITABLE) < 0)
        return NULL;
    self->has_segment = 1;
    /* Never past the map, whatever the caller says. */
    if (limit > base + (unsigned long long)self->segment.len)
        limit = base + (unsigned long long)self->segment.len;
    self->base_word = base;
    self->limit_word = limit;
    self->fd = (int)fd;
    self->base_offset = base_offset;
    Py_RETURN_NONE;
}

/* hide(): let go of the segment map (before the Sender closes or moves it); every send falls back until show. */
static PyObject *appender_hide(AppenderObject *self, PyObject *unused) {
    appender_hide_segment(self);
    Py_RETURN_NONE;
}

/* close(): let go of both maps; every send falls back from now on. */
static PyObject *appender_close(AppenderObject *self, PyObject *unused) {
    appender_release(self);
    Py_RETURN_NONE;
}

/* Write one record's header and payload at offset with pwritev; return 0 on an error (errno set). */
#ifdef __linux__
static int pwrite_record(int fd, long long offset, uint32_t length_word, uint32_t crc, const unsigned char *payload,
                         size_t size) {
    unsigned char header[HEADER_SIZE];
    put_u32(header, length_word);
    put_u32(header + 4, crc);
    struct iovec parts[2] = {{header, HEADER_SIZE}, {(void *)payload, size}};
    struct iovec *part = parts;
    int count = 2;
    while (count > 0) {
        ssize_t written = pwritev(fd, part, count, (off_t)offset);
        if (written < 0) {
            if (errno == EINTR)
                continue;
            return 0;
        }
        if (written == 0)
            return 0;
        offset += written;
        /* A short write (a signal, a full disk): skip what went, write the rest. */
        while (count > 0 && (size_t)written >= part->iov_len) {
            written -= (ssize_t)part->iov_len;
            part++;
            count--;
        }
        if (count > 0) {
            part->iov_base = (unsigned char *)part->iov_base + written;
            part->iov_len -= (size_t)written;
        }
    }
    return 1;
}
#else
/* pwritev is recent on macOS: elsewhere records from pwrite_from on take the Python path. */
static int pwrite_record(int fd, long long offset, uint32_t length_word, uint32_t crc, const unsigned char *payload,
                         size_t size) {
    return 0;
}
#endif

/* send(data) -> 0 (not done: take the Python path), 1 (sent), 2 (sent, and a receiver waits for data). */
static PyObject *appender_send(AppenderObject *self, PyObject *data) {
    PyTypeObject *type = Py_TYPE(data);
    if (type != &PyBytes_Type && (PyObject *)type != framed_type)
        return PyLong_FromLong(0);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (size > self->size_limit || !self->has_segment)
        return PyLong_FromLong(0);
#ifndef __linux__
    if (size >= self->pwrite_from)
        return PyLong_FromLong(0); /* no pwritev here (see pwrite_record) */
#endif
    if (sem_trywait(self->sem) != 0)
        return PyLong_FromLong(0); /* busy (or EINTR/EAGAIN): the Python path waits, and takes over a dead holder */
    uint64_t *words = (uint64_t *)self->control.buf;
    unsigned long long word = __atomic_load_n(&words[self->tail_index], __ATOMIC_ACQUIRE);
    unsigned long long end_word = word + HEADER_SIZE + (unsigned long long)size;
    if (word < self->base_word || end_word > self->limit_word) {
        sem_post(self->sem);
        return PyLong_FromLong(0); /* another segment or window: the Python path rolls over */
    }
    if (word != self->last_word)
        __atomic_store_n(&words[self->owner_index], (uint64_t)self->pid, __ATOMIC_RELAXED);
    unsigned char *at = (unsigned char *)self->segment.buf + (word - self->base_word);
    const unsigned char *payload = (const unsigned char *)PyBytes_AS_STRING(data);
    uint32_t length_word = (uint32_t)size;
    uint32_t flip = (PyObject *)type == framed_type ? HEADED_CRC : 0;
    if (size < self->pwrite_from) {
        memcpy(at + HEADER_SIZE, payload, (size_t)size);
        put_u32(at + 4, record_crc(length_word, payload, (size_t)size) ^ flip);
        put_u32(at, length_word);
    } else if (!pwrite_record(self->fd, self->base_offset + (long long)(word - self->base_word), length_word,
                              record_crc(length_word, payload, (size_t)size) ^ flip, payload, (size_t)size)) {
        /* Nothing published: the Python path writes it again, and raises the error if it recurs. */
        sem_post(self->sem);
        return PyLong_FromLong(0);
    }
    __atomic_store_n(&words[self->tail_index], (uint64_t)end_word, __ATOMIC_RELEASE);
    sem_post(self->sem);
    self->last_word = end_word;
    unsigned char waiting = __atomic_load_n((unsigned char *)self->control.buf + self->waiting_offset, __ATOMIC_RELAXED);
    return PyLong_FromLong(waiting ? 2 : 1);
}

static PyMethodDef appender_methods[] = {
    {"send", (PyCFunction)appender_send, METH_O,
     "send(data) -> 0: not sent (take the Python path), 1: sent, 2: sent and a receiver waits."},
    {"show", (PyCFunction)(void (*)(void))appender_show, METH_FASTCALL,
     "show(segment_map, base_word, limit_word, fd, base_offset): append into this map from now on."},
    {"hide", (PyCFunction)appender_hide, METH_NOARGS, "hide(): let go of the segment map; sends fall back until show()."},
    {"close", (PyCFunction)appender_close, METH_NOARGS, "close(): let go of every map; sends fall back from now on."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef appender_members[] = {
    {"last_word", T_ULONGLONG, offsetof(AppenderObject, last_word), 0, "tail word after this sender's last append"},
    {"size_limit", T_PYSSIZET, offsetof(AppenderObject, size_limit), 0, "largest payload sent here; -1: none"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject AppenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "segq._speedups.Appender",
    .tp_basicsize = sizeof(AppenderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The append of one small plain record, for Sender.send (see _speedups.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)appender_init,
    .tp_dealloc = (destructor)appender_dealloc,
    .tp_methods = appender_methods,
    .tp_members = appender_members,
};
#endif

static PyMethodDef methods[] = {
    {"encode_headers", (PyCFunction)(void (*)(void))encode_headers, METH_FASTCALL,
     "encode_headers(headers, allow_reserved) -> header block, or None (let Python explain)."},
    {"split_body", split_body, METH_O, "split_body(body) -> (data, headers), or None if the block does not parse."},
    {"set_framed_type", set_framed_type, METH_O, "set_framed_type(cls): the bytes subclass of bodies with headers."},
    {"frame_into", (PyCFunction)(void (*)(void))frame_into, METH_FASTCALL,
     "frame_into(target, offset, payload) -> end offset: write one record into a writable buffer."},
    {"read_record", (PyCFunction)(void (*)(void))read_record, METH_FASTCALL,
     "read_record(buffer, offset) -> payload or None: decode one intact record."},
    {"encode_batch", encode_batch, METH_O, "encode_batch(list of bytes) -> bytes: frame a batch."},
    {"frame_batch", (PyCFunction)(void (*)(void))frame_batch, METH_FASTCALL,
     "frame_batch(records, limit) -> bytes, or the size of a record over limit, or None if one is not bytes."},
    {"decode_run", (PyCFunction)(void (*)(void))decode_run, METH_FASTCALL,
     "decode_run(buffer, offset, max_count) -> (payloads, next offset)."},
    {"new_message", (PyCFunction)(void (*)(void))new_message, METH_FASTCALL,
     "new_message(cls, owner, data, start, end) -> a message of class cls (a MessageFields subclass)."},
    {"decode_messages", (PyCFunction)(void (*)(void))decode_messages, METH_FASTCALL,
     "decode_messages(buffer, offset, max_count, cls, owner, base_word) -> (messages, next offset, framed count)."},
    {"write_slot", (PyCFunction)(void (*)(void))write_slot, METH_FASTCALL,
     "write_slot(target, base, sequence, segment, offset): store a cursor slot's words and CRC."},
#ifdef __linux__
    {"mutex_lock", mutex_lock, METH_O,
     "mutex_lock(view) -> 0 or an errno (ETIMEDOUT: still busy after a short wait) for the mutex at the start of view."},
    {"mutex_timedlock", (PyCFunction)(void (*)(void))mutex_timedlock, METH_FASTCALL,
     "mutex_timedlock(view, seconds) -> 0 or an errno (ETIMEDOUT: still busy after seconds)."},
    {"mutex_unlock", mutex_unlock, METH_O, "mutex_unlock(view) -> pthread_mutex_unlock's result."},
#endif
    {"crc32", (PyCFunction)(void (*)(void))crc32, METH_FASTCALL, "crc32(data, value=0): zlib-compatible CRC-32."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "segq._speedups", "Optional C versions of segq's record framing.", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    crc_init();
#ifdef HAVE_CLMUL_PATH
    __builtin_cpu_init();
    use_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1") &&
                !getenv("SEGQ_NO_CLMUL");
#endif
    if (PyType_Ready(&MessageFieldsType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    Py_INCREF(&MessageFieldsType);
    if (PyModule_AddObject(module, "MessageFields", (PyObject *)&MessageFieldsType) < 0) {
        Py_DECREF(&MessageFieldsType);
        Py_DECREF(module);
        return NULL;
    }
#ifdef HAVE_APPENDER
    if (PyType_Ready(&AppenderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&AppenderType);
    if (PyModule_AddObject(module, "Appender", (PyObject *)&AppenderType) < 0) {
        Py_DECREF(&AppenderType);
        Py_DECREF(module);
        return NULL;
    }
#endif
    return module;
}
