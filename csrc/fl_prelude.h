/*
 * Included first by every C source of fastlive (and by the cffi-generated
 * module): the system types the fl_*.h API headers use.  The API headers
 * themselves stay free of #include so cffi's cdef can read them.
 */
#ifndef FL_PRELUDE_H
#define FL_PRELUDE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#endif
