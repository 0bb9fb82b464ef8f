# stordom serving the partitions of its boot module (module:0:pN): dom0
# writes an MBR into the image before stordom boots (two primaries and an
# extended partition holding one logical), and data into each partition.
# Each partition attached to dom0's blkfront in turn must have its size
# and its data; what is written through partition 2 must stay inside it.
modprobe xen-blkfront || { result setup fail "modprobe xen-blkfront"; return 1; }
IMG=/tmp/module0.img
MIB=1048576
truncate -s 32M $IMG

# oct N: appends byte N's octal escape to $esc (no process started).
oct() { esc="$esc\\$(($1 / 64))$(($1 / 8 % 8))$(($1 % 8))"; }
# record BLOCK SLOT TYPE START COUNT: an MBR or EBR record in 512-byte
# block BLOCK (boot indicator 0, no CHS), and the block's 0x55AA.
record() {
    local v
    esc=""
    oct 0; oct 0; oct 0; oct 0; oct $3; oct 0; oct 0; oct 0
    for v in $4 $5; do
        oct $((v & 255)); oct $((v >> 8 & 255)); oct $((v >> 16 & 255)); oct $((v >> 24 & 255))
    done
    printf "$esc" | dd of=$IMG bs=1 seek=$(($1 * 512 + 446 + 16 * $2)) conv=notrunc 2>/dev/null
    printf '\125\252' | dd of=$IMG bs=1 seek=$(($1 * 512 + 510)) conv=notrunc 2>/dev/null
}
# Sectors: p1 2048+8192, p2 10240+8192, p3 extended 18432-65535 whose
# EBR (at 18432) gives p5 20480+8192.
record 0 0 131 2048 8192
record 0 1 131 10240 8192
record 0 2 5 18432 47104
record 18432 0 131 2048 8192

pattern() {  # pattern TEXT FILE: 4 MiB of lines naming TEXT
    yes "$1" | head -c $((4 * MIB)) >"$2"
}
pattern "partition 1" /tmp/p1
pattern "partition 2" /tmp/p2
pattern "partition 5" /tmp/p5
pattern "written through partition 2" /tmp/p2new
dd if=/tmp/p1 of=$IMG bs=1M seek=1 conv=notrunc 2>/dev/null
dd if=/tmp/p2 of=$IMG bs=1M seek=5 conv=notrunc 2>/dev/null
dd if=/tmp/p5 of=$IMG bs=1M seek=10 conv=notrunc 2>/dev/null

domain_create /scenario/stordom.cfg || return 1
stordom_ready stordom || return 1

attach() {  # attach TARGET: TARGET as dom0's xvdb, its device node there
    local n=0
    xl block-attach 0 "backend=stordom, vdev=xvdb, access=rw, target=$1" || return 1
    until [ -b /dev/xvdb ] && [ -e /sys/block/xvdb/size ]; do
        n=$((n + 1)); [ $n -gt 100 ] && return 1
        nap 0.1
    done
}
detach() {  # detach NAME: xvdb away, stordom holding no grant of it
    local n=0
    xl block-detach 0 xvdb || { result detach:$1 fail "xl block-detach failed"; return 1; }
    while [ -b /dev/xvdb ]; do
        n=$((n + 1)); [ $n -gt 100 ] && break
        nap 0.1
    done
    grants_released stordom grants-released:$1
}
# holds NAME FILE: xvdb is 8192 sectors holding FILE's 4 MiB (result NAME).
holds() {
    local size
    read -r size </sys/block/xvdb/size
    if [ "$size" != 8192 ]; then
        result $1 fail "xvdb has $size sectors, not 8192"
    elif dd if=/dev/xvdb bs=1M count=4 iflag=direct 2>/dev/null | cmp -s - "$2"; then
        result $1 pass
    else
        result $1 fail "xvdb does not hold $2"
    fi
}

for p in 1 5 2; do
    attach module:0:p$p || { result attach:p$p fail "xl block-attach module:0:p$p failed"; break; }
    holds data:p$p /tmp/p$p
    if [ $p = 2 ]; then
        dd if=/tmp/p2new of=/dev/xvdb bs=1M oflag=direct conv=fsync 2>/dev/null
        holds rewritten:p2 /tmp/p2new
    fi
    detach p$p || break
done
# The neighbours kept their data; the whole module shows partition 2's
# new data where partition 2 is.
for p in 1 5; do
    attach module:0:p$p || { result attach:p$p-again fail "xl block-attach failed"; break; }
    holds kept:p$p /tmp/p$p
    detach p$p-again || break
done
if attach module:0; then
    if dd if=/dev/xvdb bs=1M skip=5 count=4 iflag=direct 2>/dev/null | cmp -s - /tmp/p2new; then
        result whole:p2-in-place pass
    else
        result whole:p2-in-place fail "module:0 does not hold partition 2's writes at 5 MiB"
    fi
    detach whole
else
    result attach:whole fail "xl block-attach module:0 failed"
fi
xl shutdown stordom
wait_gone stordom 30
