#!/bin/sh
# test-daemon-units.sh: the generated systemd units pass 'systemd-analyze
# verify' (with the man pages they name), keep the settings dsparkd relies on,
# name dsparkd's configuration directory, and the sysusers.d and tmpfiles.d
# files apply cleanly to an empty root.
. "${DS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/integration/pg-harness.sh"

command -v systemd-analyze >/dev/null 2>&1 || tap_skip_all "systemd-analyze not found (install systemd)"
UNIT="$DS_BUILDDIR/systemd/dsparkd.service"
WUNIT="$DS_BUILDDIR/systemd/dspark-worker@.service"
[ -f "$UNIT" ] && [ -f "$WUNIT" ] || tap_skip_all "units not generated (make check builds them)"

T=$(mktemp -d "${TMPDIR:-/tmp}/dspark-units.XXXXXX")
trap 'rm -rf "$T"' EXIT

# the unit as installed, but pointing at the programs of this build tree
exec_path=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$UNIT")
tap_like "$exec_path" '^/.*/dsparkd$' "ExecStart names an absolute dsparkd path ('$exec_path')"
# (a file named with --config must exist: a fresh install, with only the example, then failed to start with 78)
tap_is "$(grep -c '^ExecStart=.*--config' "$UNIT")" "0" \
    "dsparkd.service names no --config: without the default file dsparkd runs on the defaults"
tap_is "$(grep -c '@[a-z]*@' "$UNIT" "$WUNIT" | awk -F: '{ s += $2 } END { print s }')" "0" \
    "no @variable@ is left in the generated units"
mkdir -p "$T/units" "$T/man/man5" "$T/man/man7" "$T/man/man8"
sed "s|^ExecStart=$exec_path|ExecStart=$DS_BUILDDIR/dsparkd|" "$UNIT" >"$T/units/dsparkd.service"
worker=$DS_BUILDDIR/dspark-worker
[ -x "$worker" ] || worker=$DS_BUILDDIR/dsparkd   # the unit's syntax is what is checked
sed "s|^ExecStart=[^ ]*|ExecStart=$worker|" "$WUNIT" >"$T/units/dspark-worker@0.service"
for p in dsparkd.8 dspark-worker.8 dspark.conf.5 dspark.7; do
    cp "$DS_SRCDIR/man/$p" "$T/man/man${p##*.}/$p"
done
cp "$DS_SRCDIR/man/dsparkctl.1" "$T/man/" 2>/dev/null

for u in dsparkd.service dspark-worker@0.service; do
    out=$(cd "$T/units" && MANPATH="$T/man" systemd-analyze verify "$u" 2>&1)
    rc=$?
    tap_is "$rc:$out" "0:" "systemd-analyze verify $u is clean"
done

for kv in Type=notify NotifyAccess=main WatchdogSec=30 Restart=on-failure 'ExecReload=/bin/kill -HUP $MAINPID' \
        User=dspark NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes DevicePolicy=closed \
        'DeviceAllow=/dev/nvidiactl rw' 'DeviceAllow=/dev/nvidia-uvm rw' 'DeviceAllow=char-nvidia-frontend rw' \
        RuntimeDirectory=dspark StateDirectory=dspark ConfigurationDirectory=dspark UMask=0077 KillMode=mixed \
        RestartPreventExitStatus=78 'Documentation=man:dsparkd(8) man:dspark.conf(5) man:dspark(7)'; do
    grep -qxF -- "$kv" "$UNIT"
    tap_result $? "dsparkd.service has $kv"
done

# drain timeout + 10 s grace must fit in TimeoutStopSec
stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$UNIT")
tap_result $([ -n "$stop" ] && [ "$stop" -gt 70 ]; echo $?) "TimeoutStopSec ($stop) exceeds the default drain timeout plus grace"

# the file dsparkd reads by default is the one the tmpfiles.d entry and the worker unit name (they named
# /etc/dspark whatever --sysconfdir said)
conf=$("$DS_BUILDDIR/dsparkd" --help | sed -n 's/.*--config=FILE .*(default: \(.*\))$/\1/p')
tap_is "$(awk '$1 == "z" { print $2; exit }' "$DS_BUILDDIR/systemd/tmpfiles.d/dspark.conf")|$(sed -n \
    's/^EnvironmentFile=-\(.*\)\/worker.env$/\1/p' "$WUNIT")" "$conf|$(dirname "$conf")" \
    "the tmpfiles.d entry and the worker unit name dsparkd's configuration directory ($(dirname "$conf"))"
if command -v systemd-sysusers >/dev/null 2>&1 && command -v systemd-tmpfiles >/dev/null 2>&1; then
    mkdir -p "$T/root/etc" "$T/root$(dirname "$conf")"
    touch "$T/root$conf"
    out=$(systemd-sysusers --root="$T/root" "$DS_BUILDDIR/systemd/sysusers.d/dspark.conf" 2>&1)
    tap_is "$?" "0" "sysusers.d entry applies"
    tap_like "$(cat "$T/root/etc/passwd" 2>/dev/null)" '^dspark:x:[0-9]+:[0-9]+:.*:/var/lib/dspark:' \
        "it creates the user dspark with home /var/lib/dspark"
    out=$(systemd-tmpfiles --root="$T/root" --create "$DS_BUILDDIR/systemd/tmpfiles.d/dspark.conf" 2>&1)
    tap_is "$?:$out" "0:" "tmpfiles.d entry applies cleanly"
    gid=$(awk -F: '$1 == "dspark" { print $3 }' "$T/root/etc/group")
    tap_is "$(stat -c '%a %g' "$T/root$conf")" "640 $gid" \
        "dspark.conf becomes mode 0640, group dspark"
else
    tap_diag "systemd-sysusers or systemd-tmpfiles missing: not checking sysusers.d and tmpfiles.d"
fi

tap_done
