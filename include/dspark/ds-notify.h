/* ds-notify.h: the service manager notification protocol (sd_notify(3)).
 *
 * Messages such as "READY=1", "STATUS=...", "WATCHDOG=1", "STOPPING=1",
 * "RELOADING=1\nMONOTONIC_USEC=..." go as one datagram to the AF_UNIX socket named
 * by $NOTIFY_SOCKET (a path, or "@name" in the abstract namespace). Without
 * $NOTIFY_SOCKET every call is a no-op that returns 0. Builds with libsystemd
 * use sd_notify(); others use an own implementation of the same datagram
 * protocol. */
#ifndef DS_NOTIFY_H
#define DS_NOTIFY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-err.h"

/* Send state (newline-separated assignments). Returns 1 when sent, 0 when no
 * manager listens, or -DS_EIO. */
int ds_notify(const char *state);
int ds_notifyf(const char *fmt, ...) DS_PRINTF(1, 2);

/* "RELOADING=1" with MONOTONIC_USEC= of now, as systemd.service(5) asks for Type=notify-reload. */
int ds_notify_reloading(void);

/* Is the watchdog enabled for this process ($WATCHDOG_USEC, and $WATCHDOG_PID
 * naming us when set)? On true, *ret_usec gets the interval. */
bool ds_watchdog_enabled(uint64_t *ret_usec);

/* Remove NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from the environment
 * (for a child that must not talk to our manager). */
void ds_notify_unset_env(void);

/* CLOCK_MONOTONIC in microseconds. */
uint64_t ds_now_usec(void);

/* `bytes` (at most 64) random bytes from the kernel (mixed from the clocks and the pid where it does not
 * answer), written into out as 2 x bytes hex digits and a NUL: tokens that tell processes and subscribers
 * apart. */
void ds_random_hex(char *out, size_t bytes);

#endif
