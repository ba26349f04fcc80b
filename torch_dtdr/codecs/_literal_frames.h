/* zstd frames of Huffman-coded literal blocks (see _literal_frames.c). */
#ifndef TORCH_DTDR_LITERAL_FRAMES_H
#define TORCH_DTDR_LITERAL_FRAMES_H

#include <stddef.h>
#include <stdint.h>

/* The most bytes literal_frame() writes for a payload of these part sizes. */
size_t literal_frame_bound(size_t plane, size_t totals, size_t escapes);
/* One frame for the payload's three consecutive parts into dst; returns its length. */
size_t literal_frame(const uint8_t *payload, size_t plane, size_t totals, size_t escapes, uint8_t *dst);

#endif
