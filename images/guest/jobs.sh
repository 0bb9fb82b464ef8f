# Test jobs for the stordom test guest.  Each job_NAME takes a disk name
# (xvda), prints METRIC lines / diagnostics and returns 0 on pass.

FIO="fio --ioengine=libaio --direct=1 --group_reporting --eta=never"

# Disk size in MiB (or stordom.size= if smaller).
disk_mib() {
    local mib=$(( $(cat /sys/block/$1/size) / 2048 ))
    if [ -n "$SIZE" ] && [ "$SIZE" -lt "$mib" ]; then mib=$SIZE; fi
    echo $mib
}

# Data integrity: fio writes with a checksum in every block, then reads
# everything back and verifies it; random and sequential, mixed block sizes
# up to 1 MiB, fsync (a flush to the disk) every 16 writes.  The two halves
# of the disk are used so one pass cannot mask the other.  What fio moved
# in all (its terse v3 lines: field 6 KiB read, 47 KiB written) is printed
# as METRIC integrity_read_kib and integrity_write_kib, for a backend's
# byte counters to be checked against.
job_integrity() {
    local dev=/dev/$1 half=$(( $(disk_mib $1) / 2 )) rc=0
    local common="--verify=crc32c --verify_fatal=1 --do_verify=1 --fsync=16 --end_fsync=1 --iodepth=16 --bssplit=4k/25:8k/10:64k/20:128k/15:512k/15:1m/15 --blockalign=4k --randseed=20261121 --output-format=normal,terse --terse-version=3"
    echo "integrity: random writes + verify over ${half} MiB"
    $FIO --name=integrity_rand --filename=$dev --rw=randwrite --offset=0 --size=${half}M $common \
        --output=/tmp/integrity_rand.txt || rc=1
    grep -E 'err=|verify|WRITE:|READ:' /tmp/integrity_rand.txt
    echo "integrity: sequential writes + verify over ${half} MiB"
    $FIO --name=integrity_seq --filename=$dev --rw=write --offset=${half}M --size=${half}M $common \
        --output=/tmp/integrity_seq.txt || rc=1
    grep -E 'err=|verify|WRITE:|READ:' /tmp/integrity_seq.txt
    # A second, independent read-back of the whole random half with fresh
    # reads (nothing cached: O_DIRECT) after both writers finished.
    echo "integrity: re-verify random half"
    $FIO --name=integrity_rand --filename=$dev --rw=randwrite --offset=0 --size=${half}M $common \
        --verify_only --output=/tmp/integrity_reverify.txt || rc=1
    grep -E 'err=|verify|READ:' /tmp/integrity_reverify.txt
    for f in /tmp/integrity_*.txt; do
        if grep -q 'verify: bad\|bad magic\|crc32c: verify failed\|err= *[1-9]' $f; then rc=1; cat $f; fi
    done
    # The verify-only pass writes nothing, but its terse line still gives
    # the job's write size: its writes are not counted.
    awk -F';' -v d=$1 '
        $1 == "3" && NF > 47 { r += $6; if (FILENAME !~ /reverify/) w += $47 }
        END { printf "METRIC name=integrity_read_kib disk=%s value=%d unit=KiB\n", d, r
              printf "METRIC name=integrity_write_kib disk=%s value=%d unit=KiB\n", d, w }' \
        /tmp/integrity_rand.txt /tmp/integrity_seq.txt /tmp/integrity_reverify.txt
    return $rc
}

# Checks the checker: write 16 MiB with verify headers, overwrite one 4 KiB
# block behind fio's back (through the same disk path), and require fio's
# verify pass to fail and name that block.  Passes only if the corruption
# is caught.
job_canary() {
    local dev=/dev/$1
    local common="--verify=crc32c --do_verify=1 --iodepth=8 --bs=64k --randseed=7 --offset=0 --size=16M"
    $FIO --name=canary --filename=$dev --rw=randwrite $common --output=/tmp/canary_w.txt \
        || { echo "canary: clean write+verify failed"; cat /tmp/canary_w.txt; return 1; }
    dd if=/dev/urandom of=$dev bs=4096 count=1 seek=1024 oflag=direct conv=notrunc 2>/dev/null \
        || { echo "canary: corrupting write failed"; return 1; }
    if $FIO --name=canary --filename=$dev --rw=randwrite $common --verify_only \
            --output=/tmp/canary_v.txt 2>/tmp/canary_v.err; then
        echo "canary: fio did not notice a corrupted block"; return 1
    fi
    if grep -q 'offset 4194304' /tmp/canary_v.txt /tmp/canary_v.err; then
        echo "canary: corruption at 4194304 caught"; return 0
    fi
    echo "canary: fio failed but not on the corrupted block:"; cat /tmp/canary_v.err /tmp/canary_v.txt; return 1
}

# Throughput / IOPS.  Writes the region first so reads hit allocated data.
# terse v3 fields: 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS;
# with --percentile_list=50:99 the completion latency percentiles (us) are
# fields 18-19 (read) and 59-60 (write), as "50.000000%=V".
perf_one() {   # perf_one METRIC UNIT FIELD LATENCY_FIELD|- fio-args...
    local metric=$1 unit=$2 field=$3 lat=$4; shift 4
    local out
    [ "$lat" != - ] && set -- "$@" --percentile_list=50:99
    out=$($FIO --name=$metric --output-format=terse --terse-version=3 "$@") || { echo "perf: fio $metric failed"; echo "$out"; return 1; }
    local v
    v=$(echo "$out" | tail -n 1 | awk -F';' -v f=$field -v u=$unit \
        '{ if (u == "MiB/s") printf "%.1f", $f / 1024; else printf "%d", $f }')
    if [ -z "$v" ] || [ "$v" = "0" ] || [ "$v" = "0.0" ]; then
        echo "perf: $metric gave no figure: $out"; return 1
    fi
    echo "METRIC name=$metric disk=$DISK value=$v unit=$unit"
    [ "$lat" = - ] && return 0
    echo "$out" | tail -n 1 | awk -F';' -v f=$lat -v m=$metric -v d=$DISK '{
        split($f, p50, "="); split($(f + 1), p99, "=")
        printf "METRIC name=%s_p50 disk=%s value=%d unit=us\n", m, d, p50[2]
        printf "METRIC name=%s_p99 disk=%s value=%d unit=us\n", m, d, p99[2] }'
}

job_perf() {
    DISK=$1
    local dev=/dev/$1 mib=$(disk_mib $1) rc=0
    [ $mib -gt 256 ] && mib=256
    local t="--filename=$dev --size=${mib}M --runtime=$PERF_RUNTIME --time_based --ramp_time=1"
    perf_one seq_write_1m MiB/s 48 - $t --rw=write --bs=1m --iodepth=8 || rc=1
    perf_one seq_read_1m MiB/s 7 - $t --rw=read --bs=1m --iodepth=8 || rc=1
    perf_one rand_read_4k_qd1 IOPS 8 18 $t --rw=randread --bs=4k --iodepth=1 || rc=1
    perf_one rand_read_4k_qd32 IOPS 8 - $t --rw=randread --bs=4k --iodepth=32 || rc=1
    perf_one rand_write_4k_qd1 IOPS 49 59 $t --rw=randwrite --bs=4k --iodepth=1 || rc=1
    perf_one rand_write_4k_qd32 IOPS 49 - $t --rw=randwrite --bs=4k --iodepth=32 || rc=1
    return $rc
}

# File system: mkfs.ext4, fsck, mount, write files, umount, fsck, re-mount,
# compare checksums.
job_fs() {
    local dev=/dev/$1 rc=0
    mkfs.ext4 -q -F $dev || { echo "fs: mkfs.ext4 failed"; return 1; }
    e2fsck -fn $dev || { echo "fs: e2fsck after mkfs failed"; return 1; }
    mount -t ext4 $dev /mnt || { echo "fs: mount failed"; return 1; }
    mkdir -p /mnt/d
    local i
    for i in 1 2 3 4; do
        dd if=/dev/urandom of=/mnt/d/f$i bs=1M count=4 2>/dev/null || rc=1
    done
    (cd /mnt/d && md5sum f1 f2 f3 f4) >/tmp/sums || rc=1
    sync
    umount /mnt || { echo "fs: umount failed"; return 1; }
    e2fsck -fn $dev || { echo "fs: e2fsck after writing failed"; rc=1; }
    mount -t ext4 -o ro $dev /mnt || { echo "fs: re-mount failed"; return 1; }
    (cd /mnt/d && md5sum -c /tmp/sums) || { echo "fs: checksums differ after re-mount"; rc=1; }
    umount /mnt
    return $rc
}

# Survives a reboot: the first boot writes 1 MiB of marker data, then a
# generation block, both synced, and reboots; the next boot finds the
# generation block and requires the marker data.  (A disk that loses the
# generation block makes the guest loop, and the scenario times out.)
job_persist() {
    local dev=/dev/$1 gen=stordom-persist-gen-1
    yes "stordom persist marker" | head -c 1048576 >/tmp/marker
    { printf '%s' $gen; head -c $((4096 - ${#gen})) /dev/zero; } >/tmp/gen
    if dd if=$dev bs=4096 count=1 skip=1024 iflag=direct 2>/dev/null | cmp -s - /tmp/gen; then
        dd if=$dev of=/tmp/found bs=1M count=1 skip=8 iflag=direct 2>/dev/null
        if cmp -s /tmp/found /tmp/marker; then
            echo "persist: the data written before the reboot is there"; return 0
        fi
        echo "persist: the data written before the reboot is gone"; return 1
    fi
    dd if=/tmp/marker of=$dev bs=1M seek=8 oflag=direct conv=fsync,notrunc 2>/dev/null || return 1
    dd if=/tmp/gen of=$dev bs=4096 seek=1024 oflag=direct conv=fsync,notrunc 2>/dev/null || return 1
    echo "RESULT name=persist-written disk=$1 status=pass"
    echo "persist: marker written; rebooting"
    reboot -f
}

# Soak: for SOAK_SECS, four fio jobs at once on four quarters of the disk:
# random writes with crc32c verify at QD1, QD16 and QD64 (mixed sizes 4k-1M,
# an fsync every few writes, written blocks read back and checked as they
# go), and random discards.  A watcher reads the disk's counters every
# second and fails the job when requests are in flight and none completes
# for 10 s (a stall), naming the moment.
job_soak() {
    local dev=/dev/$1 q=$(( $(disk_mib $1) / 4 )) rc=0
    local v="--rw=randwrite --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_backlog=16 --blockalign=4k"
    rm -f /tmp/soak_stall
    soak_watch $1 &
    local watcher=$!
    echo "soak: ${SOAK_SECS} s on $1, 4 jobs over ${q} MiB quarters"
    $FIO --time_based --runtime=$SOAK_SECS --randseed=$$ --output=/tmp/soak.txt \
        --name=qd1 --filename=$dev --offset=0 --size=${q}M --iodepth=1 $v --fsync=4 \
            --bssplit=4k/50:64k/30:1m/20 \
        --name=qd16 --filename=$dev --offset=${q}M --size=${q}M --iodepth=16 $v --fsync=16 \
            --bssplit=4k/40:16k/20:128k/20:1m/20 \
        --name=qd64 --filename=$dev --offset=$((2 * q))M --size=${q}M --iodepth=64 $v --fsync=64 \
            --bssplit=4k/60:8k/20:64k/20 \
        --name=trim --filename=$dev --offset=$((3 * q))M --size=${q}M --iodepth=4 --rw=randtrim \
            --bs=64k || rc=1
    kill $watcher 2>/dev/null
    grep -E 'err=|verify|WRITE:|READ:|TRIM:' /tmp/soak.txt
    if grep -q 'verify: bad\|bad magic\|crc32c: verify failed\|err= *[1-9]' /tmp/soak.txt; then
        rc=1; cat /tmp/soak.txt
    fi
    [ -e /tmp/soak_stall ] && { cat /tmp/soak_stall; rc=1; }
    return $rc
}

soak_watch() {   # soak_watch DISK: the stall watcher of job_soak (builtins only)
    local rd wr inflight last="" still=0 t=0 _
    # read -t on a FIFO nobody writes: a one-second wait without a process.
    [ -p /tmp/soak.fifo ] || mkfifo /tmp/soak.fifo
    exec 8<>/tmp/soak.fifo
    while :; do
        read -r rd _ _ _ wr _ _ _ inflight _ </sys/block/$1/stat
        if [ "$inflight" -gt 0 ] && [ "$rd $wr" = "$last" ]; then
            still=$((still + 1))
            if [ $still -eq 10 ]; then
                echo "soak: STALL on $1 at ${t} s: $inflight requests in flight, none completed for 10 s" | tee /tmp/soak_stall
            fi
        else
            still=0
        fi
        last="$rd $wr"
        read -r -t 1 -u 8 _ 2>/dev/null
        t=$((t + 1))
    done
}

# Innocent bystander (issue 11): random 4k writes at QD16 with crc32c
# verify (each block read back and checked as it goes), first for
# ALONE_SECS with nothing else running, then for ATTACKED_SECS while
# dom0's hostile frontend attacks stordom through another vbd (dom0 starts
# it on the BYSTANDER-ALONE-DONE line). Fails on any verify error, or when
# the attacked phase keeps less than half the unloaded IOPS; the ratio is
# in the bystander-throughput RESULT line.
job_bystander() {
    local dev=/dev/$1 alone attacked
    alone=$(bystander_phase alone "$ALONE_SECS" $dev) || { echo "$alone"; return 1; }
    echo "BYSTANDER-ALONE-DONE iops=$alone"
    attacked=$(bystander_phase attacked "$ATTACKED_SECS" $dev) || { echo "$attacked"; return 1; }
    echo "BYSTANDER-ATTACKED-DONE iops=$attacked"
    echo "METRIC name=bystander_alone_iops disk=$1 value=$alone unit=IOPS"
    echo "METRIC name=bystander_attacked_iops disk=$1 value=$attacked unit=IOPS"
    local ratio st
    # Parenthesised: a bare `>` in printf's arguments is a redirection.
    ratio=$(awk -v a=$attacked -v b=$alone 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    st=$(awk -v r=$ratio 'BEGIN { print (r >= 0.5) ? "pass" : "fail" }')
    echo "RESULT name=bystander-throughput disk=$1 status=$st detail=\"under attack $attacked IOPS, alone $alone IOPS: ratio $ratio (at least 0.50)\""
    [ $st = pass ]
}

# Doomed: waits (up to 10 minutes) for dom0 to attach /dev/xvdb, then
# runs I/O on it that does not end (fio at QD64, reads and writes of
# 4k-128k) for dom0 to `xl destroy` this guest while its requests are in
# flight (the hostile scenario runs it after the bystander job; dom0
# attaches xvdb when its attacks are over). Prints DOOMED-IO-STARTED once
# fio runs; returns (failing) only if the disk never came or fio stopped.
job_doomed() {
    local n=0
    until [ -b /dev/xvdb ]; do
        n=$((n + 1)); [ $n -gt 1200 ] && { echo "doomed: /dev/xvdb never came"; return 1; }
        sleep 0.5
    done
    $FIO --name=doomed --filename=/dev/xvdb --size=$(disk_mib xvdb)M --runtime=3600 --time_based \
        --rw=randrw --bssplit=4k/50:64k/30:128k/20 --blockalign=4k --iodepth=64 >/tmp/doomed.txt 2>&1 &
    local pid=$!
    sleep 1
    echo "DOOMED-IO-STARTED"
    wait $pid
    echo "doomed: fio stopped (status $?)"; cat /tmp/doomed.txt
    return 1
}

# bystander_phase NAME SECONDS DEV: one verified fio run; prints its write
# IOPS, or fio's output when it failed.
bystander_phase() {
    local out=/tmp/bystander_$1.txt mib=$(disk_mib ${3#/dev/})
    $FIO --name=bystander_$1 --filename=$3 --size=${mib}M --runtime=$2 --time_based \
        --rw=randwrite --bs=4k --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --verify_backlog=16 --randseed=$$ --output-format=terse --terse-version=3 >$out 2>&1
    local rc=$?
    # terse v3: field 5 the error, 49 write IOPS. The read figures are left
    # out: they include fio's closing verify pass, which it times in
    # milliseconds (seen: 46848000 read IOPS over 1 ms).
    if [ $rc -ne 0 ] || grep -q 'verify: bad\|bad magic\|crc32c: verify failed' $out \
        || [ "$(tail -n 1 $out | cut -d';' -f5)" != 0 ]; then
        echo "bystander: fio $1 failed (status $rc)"; cat $out
        return 1
    fi
    # The fields read, on the console (stderr), so a figure can be checked.
    echo "bystander: $1 terse fields 1-9,47-50: $(tail -n 1 $out | cut -d';' -f1-9,47-50)" >&2
    tail -n 1 $out | awk -F';' '{ printf "%d", $49 }'
}

# Queue depths (issue 9): random writes of mixed sizes with crc32c verify,
# at QD1 on the first half of the disk and QD32 on the second, each block
# read back and checked as it goes and again at the end.
job_depths() {
    local dev=/dev/$1 half=$(( $(disk_mib $1) / 2 )) rc=0
    local v="--rw=randwrite --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_backlog=32 --bssplit=4k/40:16k/20:64k/20:256k/10:1m/10 --blockalign=4k --fsync=32 --end_fsync=1 --randseed=20261206"
    $FIO --output=/tmp/depths.txt \
        --name=qd1 --filename=$dev --offset=0 --size=${half}M --iodepth=1 $v \
        --name=qd32 --filename=$dev --offset=${half}M --size=${half}M --iodepth=32 $v || rc=1
    grep -E 'err=|verify|WRITE:|READ:' /tmp/depths.txt
    if grep -q 'verify: bad\|bad magic\|crc32c: verify failed\|err= *[1-9]' /tmp/depths.txt; then
        rc=1; cat /tmp/depths.txt
    fi
    return $rc
}

# Durability (issue 9): 8 MiB of random data at 16 MiB, written with
# O_DIRECT and made durable with fsync; its md5 is printed for the host,
# which compares it with the backing file after QEMU is killed (runner
# KILL mark), and for the next boot's `found` job.
DURABLE_OFFSET_MIB=16
DURABLE_MIB=8
job_durable() {
    head -c $((DURABLE_MIB << 20)) /dev/urandom >/tmp/durable
    dd if=/tmp/durable of=/dev/$1 bs=1M seek=$DURABLE_OFFSET_MIB oflag=direct conv=fsync,notrunc \
        2>/dev/null || { echo "durable: the write failed"; return 1; }
    echo "DURABLE disk=$1 offset=$((DURABLE_OFFSET_MIB << 20)) bytes=$((DURABLE_MIB << 20)) md5=$(md5sum </tmp/durable | cut -d' ' -f1)"
}

# Holds the guest (and its disks) connected, idle, until it is killed: a
# guest that shut down would have its backend flush on disconnect.
job_hold() {
    echo "hold: idle until killed"
    while :; do sleep 60; done
}

# What the durable job left: the md5 of the same 8 MiB, read fresh.
job_found() {
    local sum
    sum=$(dd if=/dev/$1 bs=1M skip=$DURABLE_OFFSET_MIB count=$DURABLE_MIB iflag=direct 2>/dev/null \
        | md5sum | cut -d' ' -f1) || return 1
    echo "FOUND disk=$1 offset=$((DURABLE_OFFSET_MIB << 20)) bytes=$((DURABLE_MIB << 20)) md5=$sum"
}
