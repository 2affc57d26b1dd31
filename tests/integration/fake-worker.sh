#!/bin/sh
# fake-worker.sh: a stand-in for dspark-worker in the dsparkd tests. It follows
# the worker side of the protocol in dspark-worker(8): records its arguments and
# environment, says READY on fd 3 (after $FAKE_WORKER_GATE exists, if set),
# sends WATCHDOG lines, and exits 0 on SIGTERM after writing "drained".
# Files go to $FAKE_WORKER_DIR/<device>.{args,env,pid,log}.
# Misbehaviour on one device, for the supervision tests:
#   FAKE_WORKER_NEVER_READY=<device>   never says READY
#   FAKE_WORKER_HANG=<device>          stops sending WATCHDOG after the first one
#   FAKE_WORKER_IGNORE_TERM=<device>   ignores SIGTERM
#   FAKE_WORKER_GATE_DEVICE=<device>   only this device waits for $FAKE_WORKER_GATE
dev=unknown
prev=
for a in "$@"; do
    [ "$prev" = --device ] && dev=$a
    prev=$a
done
d=${FAKE_WORKER_DIR:?}
printf '%s\n' "$@" >"$d/$dev.args"
env | grep -E '^(DSPARK_|NOTIFY_SOCKET|WATCHDOG_)' | sort >"$d/$dev.env"
echo $$ >"$d/$dev.pid"
echo "start $$" >>"$d/$dev.log"
if [ "${FAKE_WORKER_IGNORE_TERM:-}" = "$dev" ]; then
    trap 'echo "ignored TERM $$" >>"$d/$dev.log"' TERM
else
    trap 'echo "drained $$" >>"$d/$dev.log"; exit 0' TERM
fi
if [ -n "${FAKE_WORKER_GATE:-}" ] && [ "${FAKE_WORKER_GATE_DEVICE:-$dev}" = "$dev" ]; then
    while [ ! -e "$FAKE_WORKER_GATE" ]; do sleep 0.1; done
fi
if [ "${FAKE_WORKER_NEVER_READY:-}" = "$dev" ]; then
    while :; do sleep 0.2; done
fi
if [ -n "${DSPARK_READY_FD:-}" ]; then
    echo READY >&3
    echo "STATUS idle on device $dev" >&3
fi
n=0
while :; do
    sleep 0.2
    n=$((n + 1))
    [ "${FAKE_WORKER_HANG:-}" = "$dev" ] && [ $n -gt 1 ] && continue
    [ -n "${DSPARK_READY_FD:-}" ] && { echo WATCHDOG >&3; } 2>/dev/null
done
