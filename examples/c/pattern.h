/* The bytes the example producer writes and the consumer checks: each
 * derived from the file's name and the offset, so nothing else need be
 * shared between the two programs. */
#ifndef EXAMPLE_PATTERN_H
#define EXAMPLE_PATTERN_H

#include <stddef.h>

static unsigned char byte_at(const char *name, size_t i) {
    unsigned h = 2166136261u; /* FNV-1a of the name */
    for (const char *p = name; *p; p++) h = (h ^ (unsigned char)*p) * 16777619u;
    return (unsigned char)((h >> (i % 4 * 8)) + i * 31);
}

#endif
