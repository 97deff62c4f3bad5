/*
 * The STCP record header and STREAM frame layout, for every C file that reads or writes
 * records (docs/PROTOCOL.md §3.1 Record header, §3.2 Sequence numbers, §7.4 STREAM;
 * stcp/wire.py is the reference, and tests/test_aead_ext.py checks the constants the
 * modules export against it).
 *
 * Record = header (length:u64 | cid:u64 | seq:u64, big-endian, 24 bytes)
 *        || ciphertext || tag (16 bytes), with length = len(ciphertext) + 16;
 * seq = key epoch (top 16 bits) | packet number (low 48 bits).  A data record names a
 * nonzero cid and a nonzero seq (seq 0 is a handshake record's).
 *
 * Everything here reads headers only: nothing in this file authenticates anything, so its
 * answers are routing hints until a record opens.
 */
#ifndef STCP_RECORD_H
#define STCP_RECORD_H

#include <Python.h>
#include <stdint.h>

#define HEADER_LEN 24
#define TAG_LEN 16
#define PN_BITS 48
#define PN_MASK ((((uint64_t)1) << PN_BITS) - 1)
/* EVP takes int lengths; stay well clear of INT_MAX. */
#define MAX_PLAINTEXT ((Py_ssize_t)0x3FFFFFFF)

#define FRAME_STREAM 0x03
#define STREAM_FLAG_FIN 0x01
#define STREAM_FRAME_OVERHEAD 12     /* type:u8 | flags:u8 | offset:u64 | length:u16 */

static inline void put_be64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
}

static inline uint64_t get_be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

/* 1 if p[0:len] is a data record by its header (at least a header long, cid != 0,
 * seq != 0), with *cid and *seq set; else 0. */
static inline int data_record_header(const unsigned char *p, Py_ssize_t len, uint64_t *cid, uint64_t *seq) {
    if (len < HEADER_LEN) return 0;
    *cid = get_be64(p + 8);
    *seq = get_be64(p + 16);
    return *cid != 0 && *seq != 0;
}

/* A record's framing: 0 if its length field matches its size and it can hold a tag and a
 * plaintext EVP can take, else -1 with *why set. */
static inline int check_record(const unsigned char *rec, Py_ssize_t len, const char **why) {
    if (len < HEADER_LEN + TAG_LEN) {
        *why = "record shorter than header and tag";
        return -1;
    }
    if (len - HEADER_LEN > MAX_PLAINTEXT + TAG_LEN) {
        *why = "record too large";
        return -1;
    }
    if (get_be64(rec) != (uint64_t)(len - HEADER_LEN)) {
        *why = "length field does not match the record's size";
        return -1;
    }
    return 0;
}

#endif
