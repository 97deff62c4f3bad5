/*
 * stcp._xsk, receive batches (xsk_gro.c): recv() turns the frames it takes off the RX ring
 * into entries as UDP GRO would, one flow's consecutive datagrams joined.
 */
#ifndef STCP_XSK_GRO_H
#define STCP_XSK_GRO_H

#include <Python.h>
#include <stdint.h>

#include "xsk_frame.h"

#define RX_GRO_MAX 64               /* datagrams joined into one entry, as UDP GRO joins */

typedef struct {
    PyObject *result;               /* the entries so far */
    PyObject *templates;            /* {addr: reply template}, with templates */
    int v4mapped, want_templates, gro;
    unsigned int ifindex;
    /* the open entry: its datagrams' payloads (in frames that stay put until recv returns) */
    uint32_t count, seg, total;
    int closed;                     /* a shorter datagram ended it */
    struct parsed flow;
    PyObject *addr;
    const uint8_t *ptr[RX_GRO_MAX];
    uint32_t len[RX_GRO_MAX];
    /* the last sender's address object, reused while datagrams come from it */
    struct parsed last;
    PyObject *last_addr;
} rx_batch;

void rx_batch_init(rx_batch *b, int v4mapped, unsigned int ifindex, int templates, int gro);

/* Add one parsed datagram. stable: its payload stays where it is until rx_batch_finish
 * (a ring frame); otherwise it is copied out at once, as an entry of its own. 0, or -1
 * with an exception set (then rx_batch_abort). */
int rx_batch_add(rx_batch *b, const struct parsed *p, int stable);

#define RX_PIECES_MAX 64            /* frames of one packet rx_batch_add_pieces takes */

/* Add one datagram of a packet that came in count pieces (piece[k], len[k] bytes each), p
 * parsed from the first, its payload starting skip bytes into it: the payload copied from
 * the pieces into one bytes object, an entry of its own, as rx_batch_add with stable 0. */
int rx_batch_add_pieces(rx_batch *b, const struct parsed *p, const uint8_t *const *piece, const uint32_t *len,
                        uint32_t count, uint32_t skip);

/* The entries (with templates: (entries, {addr: template})); NULL with an exception set. */
PyObject *rx_batch_finish(rx_batch *b);

/* Drop everything after an error. */
void rx_batch_abort(rx_batch *b);

/* parse_frames(): the same over whole frames given as bytes. */
extern PyMethodDef xsk_gro_functions[];

#endif
