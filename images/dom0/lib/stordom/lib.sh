# Helpers for scenario scripts running in dom0 (sourced by /init and by each
# scenario's dom0.sh).  Lines a scenario prints go to the serial console.
#   say MSG                      log a line as "[dom0] MSG"
#   result NAME pass|fail [DETAIL]   a RESULT line the runner checks
#   check NAME CMD...            run CMD, emit RESULT pass/fail for it
#   ramdisk_loop NAME MiB        RAM-backed disk (tmpfs file + loop); prints /dev/loopN
#   render CFG OUT               copy an xl config replacing @VAR@ by $VAR
#   domain_create CFG            render + `xl create`; result "create:NAME"
#   wait_gone NAME SECONDS       wait for a domain to shut down; destroy on timeout
#   domain_console NAME          path of a domain's console log in dom0
#   console_line NAME TEXT SECS  wait for TEXT in domain NAME's console
#   stordom_ready NAME           wait until stordom NAME serves (console line);
#                                on failure dom0 prints its diagnosis of it twice
#   create_backend_timed CFG NAME TEXT SECS  create a driver domain, wait for
#                                TEXT; METRIC backend_ready_ms, backend_booted_ms
#   create_guest_timed CFG NAME BACKEND  create a guest, wait for its xvda to
#                                be Connected; METRIC vbd_connected_ms
#   grants_released NAME [RESULT] stordom NAME holds no grant (result RESULT,
#                                default "grants-released")
#   same_domain NAME DOMID       NAME is still domain DOMID (result
#                                "NAME-same-domain": it never restarted)
#   offline_nvme_vf              an NVMe virtual function that cannot come
#                                up, made assignable ($OFFLINE_VF)
#   stordom_profile_mark NAME    remember stordom NAME's serving profile
#   stordom_profile_report NAME  METRIC lines (backend=NAME) of what its
#                                profile moved by since the mark, per request
#   dom0_bridge                  netback and the bridge xenbr0 at 10.0.0.1/24
#   vif_on_bridge DOMID          wait for DOMID's vif Connected and on xenbr0
#   http_get HOST PATH BODY      GET http://HOST/PATH into BODY; HTTP_STATUS
#   nbd_server_start             qemu-nbd serving $NBD_FILE ($NBD_MIB MiB) as
#                                disk0 on 10.0.0.1:10809; NBD_PID
#   metrics_match_fio GUEST IP   after GUEST's integrity job (its hold line),
#                                stordom's /metrics at IP against fio's totals
#   dom0_heartbeat, diag_listener  started by /init (see there)

# busybox sh here prefers its own applets to programs in PATH: call
# util-linux tools by full path.
say() { echo "[dom0] $*"; }

# nap SECONDS: sleep without starting a process.  Every process started in
# dom0 is a chance for the emulator's thread-local-storage trouble (see
# README), and the polling loops below would start one a second.  read -t
# on a FIFO nobody writes is a shell builtin.
[ -p /run/nap.fifo ] || mkfifo /run/nap.fifo 2>/dev/null
exec 9<>/run/nap.fifo
nap() { read -r -t "$1" -u 9 _nap_ 2>/dev/null; return 0; }

result() {
    local name=$1 st=$2; shift 2
    if [ $# -gt 0 ]; then
        echo "RESULT name=$name status=$st detail=\"$*\""
    else
        echo "RESULT name=$name status=$st"
    fi
}

check() {
    local name=$1; shift
    if "$@"; then result "$name" pass; return 0; fi
    result "$name" fail "command failed: $*"
    return 1
}

ramdisk_loop() {
    local name=$1 mib=$2 dev
    /usr/bin/fallocate -l ${mib}M /ramdisk/$name.img || { say "fallocate $name failed"; return 1; }
    dev=$(/sbin/losetup -f --show /ramdisk/$name.img) || { say "losetup $name failed"; return 1; }
    echo $dev
}

render() {
    local cfg=$1 out=$2 var
    cp "$cfg" "$out"
    for var in $(grep -o '@[A-Za-z_][A-Za-z0-9_]*@' "$cfg" | sort -u | tr -d @); do
        eval "val=\${$var-}"
        if [ -z "$val" ]; then
            say "render $cfg: variable $var is not set"
            return 1
        fi
        sed -i "s|@$var@|$val|g" "$out"
    done
}

domain_create() {
    local cfg=$1 name rendered t0 rc
    name=$(sed -n 's/^ *name *= *"\([^"]*\)".*/\1/p' "$cfg" | head -n 1)
    [ -n "$name" ] || { result "create:$cfg" fail "no name= in config"; return 1; }
    rendered=/tmp/$name.cfg
    render "$cfg" "$rendered" || { result "create:$name" fail "config not rendered"; return 1; }
    say "xl create $name ($cfg)"
    t0=$(date +%s)
    xl create "$rendered" 2>&1 | sed "s/^/[dom0] xl: /"
    rc=$?
    # The pipeline's status is sed's: ask xl whether the domain exists.
    if xl domid "$name" >/dev/null 2>&1; then
        say "domain $name created (domid $(xl domid "$name")) in $(( $(date +%s) - t0 )) s"
        result "create:$name" pass
        return 0
    fi
    result "create:$name" fail "xl create failed"
    return 1
}

wait_gone() {
    # Polls xenstore (a small program) rather than xl (which sets up all of
    # libxl each time): fewer cycles taken from the guests under TCG.
    local name=$1 timeout=$2 id n=0 t0 now checked=0 off=0
    id=$(xl domid "$name" 2>/dev/null) || { say "domain $name already gone"; result "shutdown:$name" pass; return 0; }
    read -r t0 now </proc/uptime
    t0=${t0%.*}
    while xenstore-exists "/local/domain/$id" 2>/dev/null; do
        read -r now n </proc/uptime
        n=$(( ${now%.*} - t0 ))
        # A powered-off domain is destroyed by its `xl create` monitor; when
        # that process died (seen under TCG), do its job after ~5 s.
        if [ $n -ge $((checked + 5)) ]; then
            checked=$n
            case "$(xl list "$name" 2>/dev/null | awk 'NR==2 {print $5}')" in
                *s*) off=$((off + 1)) ;;
                *) off=0 ;;
            esac
            if [ $off -ge 2 ]; then
                say "domain $name powered off but was not destroyed (its xl monitor is gone): destroying it"
                xl destroy "$name"
                break
            fi
        fi
        if [ $n -ge "$timeout" ]; then
            say "domain $name still running after $timeout s: destroying it"
            xl destroy "$name"
            result "shutdown:$name" fail "did not shut down within $timeout s"
            return 1
        fi
        nap 2
    done
    say "domain $name gone after ~$n s"
    result "shutdown:$name" pass
}

domain_console() { echo "/var/log/xen/console/guest-$1.log"; }

# uptime_cs: sets UPTIME_CS to dom0's uptime in centiseconds without
# starting a process, not even a subshell (the polling loops below run ten
# times a second; see nap).
uptime_cs() {
    local up _
    read -r up _ </proc/uptime
    UPTIME_CS=$(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

# now_ms: dom0's uptime in milliseconds (to the centisecond /proc/uptime
# gives), the same clock as uptime_cs.
now_ms() { uptime_cs; echo $((UPTIME_CS * 10)); }

# The controllers run.py's `passthrough = true` gives the machine for
# stordom: an NVMe with two namespaces and an AHCI controller with one
# disk. dom0's own NVMe, the reference, is at 00:07.0. The NVMe at
# 00:08.0 (dom0's too) has an SR-IOV virtual function: offline_nvme_vf.
STORDOM_PCI="0000:00:05.0 0000:00:06.0"
OFFLINE_VF_PF="0000:00:08.0"

# assign_controllers: hands stordom's controllers to pciback (RESULT
# assignable:BDF each).
assign_controllers() {
    local bdf out
    modprobe xen-pciback || { result pciback fail "modprobe xen-pciback"; return 1; }
    modprobe nvme || { result nvme fail "modprobe nvme"; return 1; }
    for bdf in $STORDOM_PCI; do
        if out=$(xl pci-assignable-add $bdf 2>&1); then
            result "assignable:$bdf" pass
        else
            result "assignable:$bdf" fail "$out"
            return 1
        fi
    done
}

# offline_nvme_vf: a controller that cannot come up, for stordom to refuse
# (RESULT offline-vf). Enables the one SR-IOV virtual function of the NVMe
# at $OFFLINE_VF_PF (run after assign_controllers: dom0's nvme driver owns
# the PF) with no dom0 driver probing it, never brings it online (no
# Virtualization Management command gives it resources), and hands it to
# pciback; its BDF is left in $OFFLINE_VF. QEMU's offline VF reads every
# register but CSTS as 0 (CSTS.CFS set) and refuses CC.EN.
offline_nvme_vf() {
    local pf=/sys/bus/pci/devices/$OFFLINE_VF_PF n=0 out
    OFFLINE_VF=""
    # nvme probes asynchronously: SR-IOV is configured through its driver.
    until [ -e $pf/driver ]; do
        n=$((n + 1)); [ $n -gt 50 ] && { result offline-vf fail "no driver bound to $OFFLINE_VF_PF"; return 1; }
        nap 0.2
    done
    echo 0 >$pf/sriov_drivers_autoprobe 2>/dev/null
    if ! out=$( (echo 1 >$pf/sriov_numvfs) 2>&1); then
        result offline-vf fail "enabling a virtual function of $OFFLINE_VF_PF: $out"
        return 1
    fi
    out=$(readlink $pf/virtfn0) || { result offline-vf fail "no virtfn0 under $OFFLINE_VF_PF"; return 1; }
    OFFLINE_VF=${out##*/}
    # With autoprobe off, Linux probes a VF only for the driver named in
    # its driver_override (pci_device_can_probe): without it pciback's
    # bind fails with ENODEV.
    echo pciback >/sys/bus/pci/devices/$OFFLINE_VF/driver_override
    if ! out=$(xl pci-assignable-add $OFFLINE_VF 2>&1); then
        result offline-vf fail "$OFFLINE_VF: $out"
        OFFLINE_VF=""
        return 1
    fi
    result offline-vf pass "$OFFLINE_VF, offline virtual function of $OFFLINE_VF_PF"
}

# start_hvm_stordom [BDF...]: creates the HVM stordom
# (/lib/stordom/stordom-hvm.cfg) with those PCI functions passed through
# and waits (400 s: firmware under nested TCG is slow) until it serves;
# its domid is left in $sd. On failure its firmware's serial output and
# the device model's log say why. $HVM_NAME and $HVM_EFI, when set, name
# the domain and its image (the ab-nvme scenario's second build).
start_hvm_stordom() {
    local t0 bdf pci="" cfg=/tmp/stordom-hvm.src name=${HVM_NAME:-stordom} seen
    seen=$(wc -l <"$(domain_console "$name")" 2>/dev/null || echo 0)
    sed -e "s/^name = .*/name = \"$name\"/" \
        -e "s|^kernel = .*|kernel = \"${HVM_EFI:-/usr/local/bin/stordom.efi}\"|" \
        -e "s|stordom-serial.log|$name-serial.log|" /lib/stordom/stordom-hvm.cfg >$cfg
    for bdf in "$@"; do pci="$pci${pci:+, }'$bdf'"; done
    [ -z "$pci" ] || echo "pci = [ $pci ]" >>$cfg
    t0=$(now_ms)
    if ! domain_create $cfg || ! stordom_ready "$name" 400 "$seen"; then
        sed 's/^/[dom0] serial: /' "/var/log/xen/$name-serial.log" 2>/dev/null | tail -n 40
        sed 's/^/[dom0] qemu-dm: /' "/var/log/xen/qemu-dm-$name.log" 2>/dev/null | tail -n 40
        return 1
    fi
    sd=$(xl domid "$name")
    say "HVM $name (domid $sd) serving $(( $(now_ms) - t0 )) ms after xl create"
}

# served_by GUEST DOMID: RESULT backend:GUEST, whether the backend of
# GUEST's first disk (xvda, 51712) lives in domain DOMID; the backend's
# path is left in $be.
served_by() {
    local id
    id=$(xl domid "$1") || { result "backend:$1" fail "no domain $1"; return 1; }
    be=$(xenstore-read /local/domain/$id/device/vbd/51712/backend 2>/dev/null)
    case "$be" in
        /local/domain/$2/backend/vbd/*) result "backend:$1" pass "$be" ;;
        *) result "backend:$1" fail "backend path '$be'"; return 1 ;;
    esac
}

# console_line NAME TEXT SECS [SKIP]: waits for TEXT in domain NAME's console
# after its first SKIP lines.
console_line() {
    local t0 log
    uptime_cs; t0=$UPTIME_CS
    log=$(domain_console $1)
    until tail -n +$((${4:-0} + 1)) "$log" 2>/dev/null | grep -q "$2"; do
        uptime_cs
        [ $((UPTIME_CS - t0)) -gt $(($3 * 100)) ] && return 1
        nap 0.1
    done
}

# stordom_ready NAME [SECS [SKIP]]: its ready line within SECS (30), after
# the first SKIP lines of its console (those of an earlier domain of that
# name).
stordom_ready() {
    local secs=${2:-30}
    if ! console_line $1 "serve: watching backend/vbd; ready" $secs "${3:-0}"; then
        result "ready:$1" fail "no ready line in $secs s"
        # Where it is stuck: its state now and 2 s later (a diagnosis
        # the runner makes only when a run times out).
        diag_dump 2>&1 | sed 's/^/[dom0] diag: /'
        nap 2
        diag_dump 2>&1 | sed 's/^/[dom0] diag: /'
        return 1
    fi
}

# create_backend_timed CFG NAME READY_TEXT SECS: creates a storage driver
# domain and reports the milliseconds from `xl create` to the console line
# that says it serves (METRIC backend_ready_ms, backend=NAME), how many
# of them `xl create` itself took, the toolstack building the domain
# (METRIC backend_created_ms), and the rest, the domain's own boot (METRIC
# backend_booted_ms).
create_backend_timed() {
    local t0 created ready
    t0=$(now_ms)
    domain_create "$1" || return 1
    created=$(( $(now_ms) - t0 ))
    echo "METRIC name=backend_created_ms backend=$2 value=$created unit=ms"
    if ! console_line $2 "$3" $4; then
        result "ready:$2" fail "no '$3' on its console within $4 s"
        return 1
    fi
    ready=$(( $(now_ms) - t0 ))
    echo "METRIC name=backend_ready_ms backend=$2 value=$ready unit=ms"
    echo "METRIC name=backend_booted_ms backend=$2 value=$(( ready - created )) unit=ms"
    result "ready:$2" pass
}

# create_guest_timed CFG NAME BACKEND: creates a guest and reports the
# milliseconds from `xl create` until its first vbd (xvda) is Connected at
# the backend (METRIC vbd_connected_ms, backend=BACKEND, a domain name).
create_guest_timed() {
    local t0 fe be state=
    t0=$(now_ms)
    domain_create "$1" || return 1
    fe=$(xl domid $2) && be=$(xl domid $3) || return 1
    until [ "$state" = 4 ]; do
        state=$(xenstore-read /local/domain/$be/backend/vbd/$fe/51712/state 2>/dev/null)
        if [ $(( $(now_ms) - t0 )) -gt 120000 ]; then
            result "connected:$2" fail "xvda not Connected at $3 within 120 s (state '$state')"
            return 1
        fi
        nap 0.1
    done
    echo "METRIC name=vbd_connected_ms backend=$3 value=$(( $(now_ms) - t0 )) unit=ms"
}

grants_released() {
    local sd n=0 mapped what=${2:-grants-released}
    sd=$(xl domid "$1") || { result "$what" fail "no domain $1"; return 1; }
    until [ "$(xenstore-read /local/domain/$sd/data/grants-mapped 2>/dev/null)" = 0 ]; do
        n=$((n + 1)); [ $n -gt 50 ] && break
        sleep 0.1
    done
    mapped=$(xenstore-read /local/domain/$sd/data/grants-mapped 2>/dev/null)
    if [ "$mapped" = 0 ]; then
        result "$what" pass
    else
        result "$what" fail "$1 still maps '$mapped' grants"
        return 1
    fi
}

# stordom_profile NAME: stordom NAME's serving profile (its data/profile
# nodes: hypercalls by kind, requests, turns, sleeps, cpu times), one
# "node value" line each, e.g. "grant-map/calls 1234".
stordom_profile() {
    local sd
    sd=$(xl domid "$1" 2>/dev/null) || return 1
    xenstore-ls -f "/local/domain/$sd/data/profile" 2>/dev/null |
        sed -n "s|^/local/domain/$sd/data/profile/\([^ ]*\) = \"\([0-9][0-9]*\)\"\$|\1 \2|p"
}

stordom_profile_mark() {
    stordom_profile "$1" >"/tmp/profile-mark.$1"
}

# stordom_profile_report NAME: after a round served by stordom NAME (its
# guest gone), METRIC lines of what the profile moved by since
# stordom_profile_mark, per request answered meanwhile (the guest's boot
# and disk connection included): hypercalls and their busy time (sleeps
# aside), each kind's calls, time and batch size, the loop's turns and
# sleeps, segments, and the vCPU's runstate times. stordom publishes
# after a second without requests, checked once a second: wait for it.
stordom_profile_report() {
    nap 3
    stordom_profile "$1" >"/tmp/profile-now.$1" || return 1
    awk -v backend="$1" '
        FNR == NR { before[$1] = $2; next }
        { moved[$1] = $2 - before[$1]; order[++nodes] = $1 }
        function metric(name, value, unit) {
            printf "METRIC name=%s backend=%s value=%.3f unit=%s\n", name, backend, value, unit
        }
        END {
            requests = moved["requests"]
            if (requests <= 0) { print "[dom0] stordom profile: no request answered since the mark"; exit }
            printf "[dom0] stordom profile: %d requests since the mark\n", requests
            metric("hypercalls_per_request", moved["hypercalls/calls"] / requests, "calls")
            metric("hypercall_us_per_request", moved["hypercalls/busy-ns"] / 1000 / requests, "us")
            for (i = 1; i <= nodes; i++) {
                node = order[i]
                n = split(node, part, "/")
                if (n != 2 || part[1] == "hypercalls" || part[1] == "cpu" || moved[node] <= 0) continue
                kind = part[1]; gsub("-", "_", kind)
                if (part[2] == "calls") metric(kind "_calls_per_request", moved[node] / requests, "calls")
                if (part[2] == "ns") metric(kind "_us_per_request", moved[node] / 1000 / requests, "us")
                if (part[2] == "ops") metric(kind "_ops_per_call", moved[node] / moved[part[1] "/calls"], "ops")
            }
            metric("loop_turns_per_request", moved["turns"] / requests, "turns")
            metric("loop_sleeps_per_request", moved["sleeps"] / requests, "sleeps")
            metric("segments_per_request", moved["segments"] / requests, "segs")
            metric("cpu_running_us_per_request", moved["cpu/running"] / 1000 / requests, "us")
            metric("cpu_runnable_us_per_request", moved["cpu/runnable"] / 1000 / requests, "us")
            metric("cpu_blocked_us_per_request", moved["cpu/blocked"] / 1000 / requests, "us")
        }' "/tmp/profile-mark.$1" "/tmp/profile-now.$1"
}

# ab_rounds SECS [UP DOWN]: the A/B scenarios' three rounds, each running
# the guest's job (/scenario/g-stordom.cfg, SECS to finish) on stordom and
# then on stordom-b (the same guest, its disk on stordom-b, plus the xl
# config lines in $AB_GUEST_XL_B), with each round's serving profile. UP
# and DOWN, when given, are commands run with the backend's name before
# and after its guest (ab-nvme starts and stops the HVM build that owns
# the NVMe).
ab_rounds() {
    local secs=$1 up=$2 down=$3 round be cfg
    sed -e 's/^name = .*/name = "g-stordom-b"/' -e 's/backend=stordom,/backend=stordom-b,/' \
        /scenario/g-stordom.cfg >/tmp/ab-g-stordom-b.cfg
    printf '%s\n' "$AB_GUEST_XL_B" >>/tmp/ab-g-stordom-b.cfg
    for round in 1 2 3; do
        for be in stordom stordom-b; do
            cfg=/scenario/g-stordom.cfg
            [ $be = stordom ] || cfg=/tmp/ab-g-stordom-b.cfg
            [ -z "$up" ] || $up $be || return 1
            stordom_profile_mark $be
            create_guest_timed $cfg g-$be $be || return 1
            # Where B's pinning, if any, put the guest.
            [ $be = stordom ] || [ -z "$AB_GUEST_XL_B" ] || xl vcpu-list g-$be | sed 's/^/[dom0] /'
            wait_gone g-$be "$secs"
            stordom_profile_report $be
            [ -z "$down" ] || $down $be
        done
    done
}

# dom0_bridge: netback loaded and a bridge xenbr0 with dom0 at 10.0.0.1/24
# for driver domains' vifs (`vif = [ 'bridge=xenbr0,ip=...' ]`).
dom0_bridge() {
    # lo up too: dom0's own connections to 10.0.0.1 (the nbd client) go
    # through it.
    if modprobe xen-netback && modprobe bridge && ip link set lo up \
            && brctl addbr xenbr0 \
            && ip addr add 10.0.0.1/24 dev xenbr0 && ip link set xenbr0 up; then
        result bridge pass "xenbr0 10.0.0.1/24, netback loaded"
    else
        result bridge fail "netback or bridge setup failed"
        return 1
    fi
}

# vif_on_bridge DOMID: netback Connected to DOMID's first vif and the
# hotplug script (vif-bridge) put it on the bridge (result vif-connected).
vif_on_bridge() {
    local vif=/local/domain/0/backend/vif/$1/0 n=0
    until [ "$(xenstore-read $vif/state 2>/dev/null)" = 4 ] && [ -e /sys/class/net/xenbr0/brif/vif$1.0 ]; do
        n=$((n + 1)); [ $n -gt 300 ] && break
        nap 0.2
    done
    if [ $n -le 300 ]; then
        result vif-connected pass "vif$1.0 on xenbr0, backend state 4"
    else
        result vif-connected fail "backend state '$(xenstore-read $vif/state 2>/dev/null)', bridge ports: $(ls /sys/class/net/xenbr0/brif 2>/dev/null)"
        xenstore-ls -f $vif 2>&1 | sed 's/^/[dom0]   /'
        xenstore-ls -f /local/domain/$1/device/vif 2>&1 | sed 's/^/[dom0]   /'
        return 1
    fi
}

# http_get HOST PATH BODY_FILE: GET http://HOST/PATH with curl (busybox's
# static wget segfaults here, at the same address every time, before it
# connects: runs/20261207-025220-net). Sets HTTP_STATUS; true on 200.
http_get() {
    HTTP_STATUS=$(curl -sS -m 30 -o "$3" -w '%{http_code}' "http://$1$2" 2>/tmp/http-response)
    [ "$HTTP_STATUS" = 200 ]
}

# metrics_match_fio GUEST IP: once GUEST (jobs integrity,hold on xvda) has
# finished its fio job, stordom's /metrics at IP (results metrics-fetch,
# metrics-bytes, metrics-latency): the vbd's byte counters against what
# fio moved, never less and at most a slack more (reads: the guest
# kernel's partition scan; writes: none expected), and its latency
# histogram's reads and writes against its request counters. /tmp/metrics keeps the
# answer.
metrics_match_fio() {
    local log fio_read_kib fio_write_kib labels read_bytes written_bytes gid
    local read_slack_kib=16384 write_slack_kib=1024
    gid=$(xl domid $1) || { result metrics-bytes fail "no domain $1"; return 1; }
    log=$(domain_console $1)
    if ! console_line $1 "hold: idle until killed" 900; then
        result metrics-bytes fail "$1 did not finish its integrity job within 900 s"
        xl destroy $1
        return 1
    fi
    fio_read_kib=$(sed -n "s/.*METRIC name=integrity_read_kib disk=xvda value=\([0-9]*\) .*/\1/p" "$log" | tail -n 1)
    fio_write_kib=$(sed -n "s/.*METRIC name=integrity_write_kib disk=xvda value=\([0-9]*\) .*/\1/p" "$log" | tail -n 1)
    say "$1's fio moved ${fio_read_kib:-?} KiB read, ${fio_write_kib:-?} KiB written"
    if http_get $2 /metrics /tmp/metrics; then
        result metrics-fetch pass "$(wc -l </tmp/metrics) lines"
        sed 's/^/[dom0] metrics: /' /tmp/metrics
    else
        result metrics-fetch fail "GET http://$2/metrics: status '$HTTP_STATUS': $(head -n 3 /tmp/http-response)"
    fi
    labels="frontend=\"$gid\",devid=\"51712\""
    read_bytes=$(grep -F "stordom_vbd_read_bytes_total{$labels}" /tmp/metrics 2>/dev/null | awk '{ print $2 }' | head -n 1)
    written_bytes=$(grep -F "stordom_vbd_written_bytes_total{$labels}" /tmp/metrics 2>/dev/null | awk '{ print $2 }' | head -n 1)
    if kib_within "$read_bytes" "$fio_read_kib" $read_slack_kib \
            && kib_within "$written_bytes" "$fio_write_kib" $write_slack_kib; then
        result metrics-bytes pass "read $read_bytes B (fio $fio_read_kib KiB), written $written_bytes B (fio $fio_write_kib KiB)"
    else
        result metrics-bytes fail "read '$read_bytes' B vs fio '$fio_read_kib' KiB, written '$written_bytes' B vs fio '$fio_write_kib' KiB"
    fi
    # Every read and write answered is in the latency histogram (the guest
    # is idle: nothing in flight). Flushes are left out: the flush counter
    # counts barriers too, which the histogram has among the writes.
    local op counted timed checked=
    for op in read write; do
        counted=$(grep -F "stordom_vbd_requests_total{$labels,kind=\"$op\"}" /tmp/metrics | awk '{ print $2 }')
        timed=$(grep -F "stordom_vbd_request_duration_seconds_count{$labels,op=\"$op\"}" /tmp/metrics | awk '{ print $2 }')
        checked="$checked $op: ${timed:-none} timed, ${counted:-none} counted;"
        [ -n "$counted" ] && [ "$counted" -gt 0 ] && [ "$timed" = "$counted" ] || checked="$checked MISMATCH"
    done
    case "$checked" in
        *MISMATCH*) result metrics-latency fail "$checked" ;;
        *) result metrics-latency pass "$checked" ;;
    esac
}

kib_within() {   # kib_within COUNTED_BYTES FIO_KIB SLACK_KIB
    [ -n "$1" ] && [ -n "$2" ] && [ "$2" -gt 0 ] \
        && [ $(( $1 / 1024 )) -ge "$2" ] && [ $(( $1 / 1024 - $2 )) -le "$3" ]
}

# nbd_server_start: qemu-nbd on 10.0.0.1:10809 (dom0_bridge first), export
# disk0: $NBD_FILE, made $NBD_MIB MiB on dom0's tmpfs if missing. Cache
# writeback (the page cache outlives the process, as a file-backed
# server's does), persistent (clients one after another), up to 8 at
# once. Sets NBD_PID; true once it listens.
NBD_FILE=/tmp/nbd-disk0.img
nbd_server_start() {
    local n=0
    [ -e "$NBD_FILE" ] || truncate -s ${NBD_MIB}M "$NBD_FILE"
    qemu-nbd -f raw -x disk0 -b 10.0.0.1 -p 10809 -t -e 8 --cache=writeback \
        "$NBD_FILE" >>/tmp/qemu-nbd.log 2>&1 &
    NBD_PID=$!
    # Listening (state 0A) on 10809, 2A39 in /proc/net/tcp.
    until grep -q ":2A39 00000000:0000 0A" /proc/net/tcp 2>/dev/null; do
        n=$((n + 1))
        if [ $n -gt 100 ] || ! kill -0 $NBD_PID 2>/dev/null; then
            sed 's/^/[dom0] qemu-nbd: /' /tmp/qemu-nbd.log
            return 1
        fi
        nap 0.1
    done
}

same_domain() {
    if [ "$(xl domid "$1" 2>/dev/null)" = "$2" ]; then
        result "$1-same-domain" pass "domid $2 throughout"
    else
        result "$1-same-domain" fail "$1 was domid $2, now '$(xl domid "$1" 2>/dev/null)'"
    fi
}

# restart_control SD: makes stordom's control/restart node (control/ is the
# toolstack's: dom0 makes it and lets stordom read it; an empty value asks
# for nothing).
restart_control() {
    local node=/local/domain/$1/control/restart
    xenstore-write $node "" && xenstore-chmod $node n0 r$1 && return 0
    result setup fail "cannot make $node readable by stordom"
    return 1
}

# restart_in_place SD K HOW: asks stordom (domid SD) for its Kth in-place
# restart, writing HOW to control/restart (a reason, or the test hooks
# "panic" and "hang"); RESULT restart-K (data/restarts went to K; with the
# time it took) and restart-K-served (its console line with the pause the
# guests saw), and stordom-same-domain.
restart_in_place() {
    local sd=$1 k=$2 how=$3 t_ask n count line
    say "restart $k: control/restart = $how"
    t_ask=$(now_ms)
    xenstore-write /local/domain/$sd/control/restart "$how"
    n=0
    until [ "$(xenstore-read /local/domain/$sd/data/restarts 2>/dev/null)" = $k ]; do
        n=$((n + 1)); [ $n -gt 400 ] && break
        nap 0.1
    done
    count=$(xenstore-read /local/domain/$sd/data/restarts 2>/dev/null)
    if [ "$count" = $k ]; then
        result restart-$k pass "$how: data/restarts = $k after $(( $(now_ms) - t_ask )) ms, last-restart '$(xenstore-read /local/domain/$sd/data/last-restart 2>/dev/null)'"
    else
        result restart-$k fail "$how: data/restarts is '$count' 40 s after the request, not $k"
    fi
    same_domain stordom "$sd"
    n=0
    until grep -q "restart $k (.*): rings served again after" "$(domain_console stordom)" 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 300 ] && break
        nap 0.1
    done
    line=$(grep -o "restart $k (.*): rings served again after.*" "$(domain_console stordom)" 2>/dev/null)
    if [ -n "$line" ]; then
        result restart-$k-served pass "$line"
    else
        result restart-$k-served fail "no 'restart $k (...): rings served again' line on stordom's console"
    fi
}

# Background loop started by /init: every console log xenconsoled creates is
# copied line by line onto dom0's console as "[con:guest-NAME] line"; the
# runner splits those lines into one log per domain.
console_follower() {
    local f base
    while :; do
        for f in /var/log/xen/console/*.log; do
            [ -e "$f" ] || continue
            base=${f##*/}
            base=${base%.log}
            [ -e "/run/follow.$base" ] && continue
            echo "$f" >"/run/follow.$base"
            tail -n +1 -F "$f" 2>/dev/null | awk -v p="[con:$base] " -v d="/run/drained.$base" '
                { sub(/\r$/, ""); print p $0; fflush() }
                /^STORDOM-CONSOLE-EOF$/ { system("touch " d); exit }' &
        done
        nap 1
    done
}

# Wait until every followed console has been copied out completely (up to
# $1 seconds): append an end marker to each log and wait for its follower
# to reach it.
console_drain() {
    local limit=${1:-30} f base n=0 left
    for f in /run/follow.*; do
        [ -e "$f" ] || continue
        echo "STORDOM-CONSOLE-EOF" >>"$(cat "$f")"
    done
    while [ $n -lt $((limit * 2)) ]; do
        left=0
        for f in /run/follow.*; do
            [ -e "$f" ] || continue
            base=${f#/run/follow.}
            [ -e "/run/drained.$base" ] || left=$((left + 1))
        done
        [ $left -eq 0 ] && return 0
        nap 0.5; n=$((n + 1))
    done
    say "console_drain: $left console(s) not drained after $limit s"
}

# "[dom0] hb up=SECONDS" every 10 s (builtins only): the runner tells a
# frozen machine from a stuck domain by who is still heard from.
dom0_heartbeat() {
    local up _
    while :; do
        nap 10
        read -r up _ </proc/uptime
        echo "[dom0] hb up=$up"
    done
}

# Reads dom0's console; on a line "stordom-diag" (the runner types it when a
# run times out or a domain triple-faulted) prints dom0's view: domains, every vbd's backend and
# frontend nodes, each stordom vCPU's registers, then STORDOM-DIAG-DONE.
diag_listener() {
    local line
    while read -r line; do
        case $line in *stordom-diag*) diag_dump 2>&1 | sed 's/^/[dom0] diag: /'; echo "STORDOM-DIAG-DONE" ;; esac
    done
}

diag_dump() {
    local id name v
    xl list
    for id in $(xenstore-list /local/domain); do
        name=$(xenstore-read /local/domain/$id/name)
        echo "domain $id ($name):"
        xenstore-ls -f /local/domain/$id/device/vbd 2>/dev/null | grep -E '/(state|ring-ref[0-9]*|event-channel|queue-[0-9]+/.*|ring-page-order|protocol|feature-persistent) ='
        case $name in
            stordom*)
                xenstore-ls -f /local/domain/$id/backend/vbd 2>/dev/null | grep -vE '/(frontend|script|removable|bootable|dev|type|mode|device-type|specification|discard-enable|frontend-id|info) ='
                xenstore-ls -f /local/domain/$id/data 2>/dev/null
                for v in $(seq 0 $(( $(xenstore-list /local/domain/$id/cpu 2>/dev/null | wc -l) - 1 ))); do
                    echo "vcpu $v:"
                    timeout 10 xenctx -a $id $v
                done
                # The saved HVM state: descriptor tables, TR and the event
                # being injected, which xenctx does not show (a triple
                # fault's forensics: the domain is kept by on_reboot="preserve").
                timeout 10 xen-hvmctx $id 2>&1 | head -n 60
                ;;
        esac
    done
}
