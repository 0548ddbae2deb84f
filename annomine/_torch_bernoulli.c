/* Bernoulli masks drawn from PyTorch's CPU generator state, as PyTorch's own CPU kernel draws them.
 *
 * PyTorch's default CPU generator is a 32-bit Mersenne Twister (MT19937). Its scalar Bernoulli kernel draws one
 * element at a time: two words joined high-first into 64 bits, whose low 53 bits as a fraction of 2^53 are compared
 * with the probability. `draw` does the same in blocks of the generator's 624 words, on the generator's serialized
 * state (`torch.get_rng_state()`), and writes the advanced state back into that buffer, so that after
 * `torch.set_rng_state` the generator stands exactly where PyTorch's own draws would have left it.
 * annomine/dropout_draws.py checks the result against PyTorch once per process before using it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MT_N 624
#define MT_M 397
/* The layout of PyTorch's CPUGeneratorImplState: seed (int64), left (int32), seeded (int32), next (uint64), then the
 * 624 state words each stored as uint64; the float normal-sample fields follow and are left untouched. */
#define STATE_BYTES 5056
#define OFFSET_LEFT 8
#define OFFSET_SEEDED 12
#define OFFSET_NEXT 16
#define OFFSET_WORDS 24
#define LOW53 ((1ULL << 53) - 1)

static inline uint32_t mix(uint32_t upper, uint32_t lower, uint32_t far) {
    uint32_t y = (upper & 0x80000000u) | (lower & 0x7fffffffu);
    return far ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
}

static void twist(uint32_t *s) {
    int i = 0;
    for (; i < MT_N - MT_M; i++) s[i] = mix(s[i], s[i + 1], s[i + MT_M]);
    for (; i < MT_N - 1; i++) s[i] = mix(s[i], s[i + 1], s[i + MT_M - MT_N]);
    s[MT_N - 1] = mix(s[MT_N - 1], s[0], s[MT_M - 1]);
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

/* n draws into out (0 or 1) from words s[*pos...], twisting as needed; *pos advances. */
static void fill(uint32_t *s, int64_t *pos, uint8_t *out, Py_ssize_t n, uint64_t threshold) {
    uint32_t words[MT_N];
    Py_ssize_t i = 0;
    int64_t p = *pos;
    int carry = 0;
    uint32_t high = 0;
    while (i < n) {
        if (p >= MT_N) { twist(s); p = 0; }
        int64_t avail = MT_N - p, k = 0;
        for (int64_t j = 0; j < avail; j++) words[j] = temper(s[p + j]);
        if (carry) { out[i++] = ((((uint64_t)high << 32) | words[0]) & LOW53) < threshold; k = 1; carry = 0; }
        for (; k + 1 < avail && i < n; k += 2)
            out[i++] = ((((uint64_t)words[k] << 32) | words[k + 1]) & LOW53) < threshold;
        if (k < avail && i < n) { high = words[k]; carry = 1; k++; }
        p += k;
    }
    *pos = p;
}

static int read_state(const uint8_t *raw, uint32_t *s, int64_t *pos) {
    int32_t left, seeded;
    uint64_t next, word;
    memcpy(&left, raw + OFFSET_LEFT, 4);
    memcpy(&seeded, raw + OFFSET_SEEDED, 4);
    memcpy(&next, raw + OFFSET_NEXT, 8);
    if (!seeded || left < 1 || left > MT_N || next > MT_N) return -1;
    for (int j = 0; j < MT_N; j++) { memcpy(&word, raw + OFFSET_WORDS + 8 * j, 8); s[j] = (uint32_t)word; }
    *pos = left == 1 ? MT_N : (int64_t)next;  /* left == 1: the next draw twists first */
    return 0;
}

static void write_state(uint8_t *raw, const uint32_t *s, int64_t pos) {
    int32_t left = (int32_t)(MT_N + 1 - pos);
    uint64_t next = (uint64_t)pos, word;
    memcpy(raw + OFFSET_LEFT, &left, 4);
    memcpy(raw + OFFSET_NEXT, &next, 8);
    for (int j = 0; j < MT_N; j++) { word = s[j]; memcpy(raw + OFFSET_WORDS + 8 * j, &word, 8); }
}

static PyObject *draw(PyObject *self, PyObject *args) {
    Py_buffer state, out;
    unsigned long long threshold;
    if (!PyArg_ParseTuple(args, "w*w*K", &state, &out, &threshold)) return NULL;
    PyObject *result = NULL;
    uint32_t s[MT_N];
    int64_t pos;
    if (state.len != STATE_BYTES || read_state(state.buf, s, &pos) != 0) {
        PyErr_SetString(PyExc_ValueError, "not the state of PyTorch's seeded CPU generator");
    } else {
        if (out.len > 0) {
            Py_BEGIN_ALLOW_THREADS
            fill(s, &pos, out.buf, out.len, threshold);
            Py_END_ALLOW_THREADS
            write_state(state.buf, s, pos);
        }
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&state);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"draw", draw, METH_VARARGS,
     "draw(state, out, threshold): fill the bytes of `out` with 1 where a draw's 53 low bits < threshold, else 0, "
     "from the serialized CPU generator `state` (advanced in place)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_torch_bernoulli", NULL, -1, methods};

PyMODINIT_FUNC PyInit__torch_bernoulli(void) { return PyModule_Create(&module); }
