# stordom as an HVM driver domain owning a passed-through NVMe (two
# namespaces) and an AHCI controller, serving slices of them to stock
# Linux guests, and a third controller that cannot come up (issue 9). Two boots of the same disks (scenario.toml):
# the first ends with a power cut (the runner kills QEMU) right after two
# guests made data durable; the second finds that data.
boot=1
case " $(cat /proc/cmdline) " in *" stordom.boot=2 "*) boot=2 ;; esac
say "boot $boot of the same disks"
assign_controllers || return 1
# A third controller that cannot come up (offline_nvme_vf), last so that
# stordom names it nvme1 and the others keep their names. Without it the
# rest still runs; the failed-controller checks then fail.
offline_nvme_vf
# shellcheck disable=SC2086 # a list of PCI functions
start_hvm_stordom $STORDOM_PCI $OFFLINE_VF || return 1

# guest NAME JOBS TARGET...: starts a guest whose disks xvda, xvdb, ...
# are those targets of stordom's.
guest() {
    local name=$1 jobs=$2 specs="" disks="" letters=abcdef i=0 t
    shift 2
    for t in "$@"; do
        d=xvd${letters:$i:1}
        specs="$specs${specs:+, }'backend=stordom, vdev=$d, access=rw, target=$t'"
        disks="$disks${disks:+,}$d"
        i=$((i + 1))
    done
    sed -e "s|@GUEST@|$name|" -e "s|@JOBS@|$jobs|" -e "s|@DISKS@|$disks|" \
        -e "s|@DISK_SPECS@|$specs|" /scenario/guest.cfg >/tmp/$name.src
    domain_create /tmp/$name.src && served_by $name "$sd"
}

if [ $boot = 2 ]; then
    # A new Xen, dom0, stordom and guest: the data made durable before
    # the power cut must be there.
    guest g7 found "$RANGE_TARGET" ahci0p0 || return 1
    wait_gone g7 300
    xl shutdown stordom
    wait_gone stordom 60
    return 0
fi

# Targets that cannot be served: dom0 attaches each to itself; stordom
# must refuse it with a reason in the backend's error node (containing
# WHY, when given) and close it.
bad_target() {   # bad_target NAME TARGET [WHY]: RESULT bad-target:NAME
    local devid=51728 be err state n=0
    be=/local/domain/$sd/backend/vbd/0/$devid
    xl block-attach 0 "backend=stordom, vdev=xvdb, access=rw, target=$2" >/tmp/attach.out 2>&1 &
    until err=$(xenstore-read $be/error 2>/dev/null); do
        n=$((n + 1)); [ $n -gt 100 ] && break
        nap 0.2
    done
    state=$(xenstore-read $be/state 2>/dev/null)
    wait
    if [ -n "$err" ] && [ "$state" = 6 ] && case "$err" in *"${3-}"*) true ;; *) false ;; esac; then
        result bad-target:$1 pass "$2: closed: $err"
    else
        result bad-target:$1 fail "$2: state '$state', error '$err'; xl: $(tr '\n' ' ' </tmp/attach.out)"
    fi
    xl block-detach 0 xvdb >/dev/null 2>&1
    n=0
    while xenstore-exists $be 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 50 ] && { xenstore-rm $be; xenstore-rm /local/domain/0/device/vbd/$devid; break; }
        nap 0.2
    done
}
modprobe xen-blkfront
bad_target no-disk nvme9n1
bad_target no-partition nvme0n1:p7
bad_target past-end "nvme0n2@0+999999999"
# The disks of the controller that failed to come up, whole, a partition,
# a range: refused with the controller and why (the vbds above and below
# are served meanwhile).
failed="controller nvme1 failed to come up: "
bad_target failed-controller nvme1n1 "$failed"
bad_target failed-controller-partition nvme1n1:p1 "$failed"
bad_target failed-controller-range "nvme1n1@0+2048" "$failed"

# A hostile frontend on a 1 MiB slice between two fences: requests past
# its end are refused, the fences (host_check.py) stay as they were.
/usr/local/bin/hostile-front --target "$ATTACK_TARGET" $sd past_disk_end bad_grant 2>&1

# Four guests at once: a partition and an LBA range of namespace 1, the
# whole of namespace 2, the AHCI disk.
guest g1 depths,fs nvme0n1:p1 || return 1
guest g2 depths,fs "$RANGE_TARGET" || return 1
guest g3 depths,fs nvme0n2 || return 1
guest g4 depths,fs ahci0p0 || return 1
for g in g1 g2 g3 g4; do wait_gone $g 900; done
grants_released stordom

# The power cut: two guests make data durable (fsync returned) and stay
# connected and idle; then the runner kills QEMU.
guest g5 durable,hold "$RANGE_TARGET" || return 1
guest g6 durable,hold ahci0p0 || return 1
n=0
until grep -q "DURABLE disk=" "$(domain_console g5)" 2>/dev/null && \
      grep -q "DURABLE disk=" "$(domain_console g6)" 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 600 ] && { result durable fail "no DURABLE line from g5 and g6 in 120 s"; return 1; }
    nap 0.2
done
# Their lines, on dom0's console before the kill mark (a guest's console
# reaches the host later than dom0's own lines).
for g in g5 g6; do
    say "$g $(grep -a -m1 "DURABLE disk=" "$(domain_console $g)")"
done
result durable pass
echo "STORDOM-KILL-QEMU: g5 and g6 made their data durable"
# The runner kills QEMU on that line; what follows never runs.
nap 60
result power-cut fail "QEMU was not killed"
