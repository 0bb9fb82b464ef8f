# stordom as an HVM guest (issue 9's first step): booted by OVMF and GRUB,
# it serves a stock Linux guest's disk like the PVH stordom.
start_hvm_stordom || return 1
# Its first lines go to the emulated serial port (the PV console comes
# up later in its boot).
serial=/var/log/xen/stordom-serial.log
if line=$(grep -a -m1 "multiboot2 boot" $serial); then
    result hvm-boot pass "$line; $(grep -a -m1 'boot complete' "$(domain_console stordom)")"
else
    result hvm-boot fail "no multiboot2 boot line in stordom's serial output"
fi
grep -a "INFO\|WARN\|ERROR" $serial | sed 's/^/[dom0] serial: /' | head -n 40
domain_create /scenario/g1.cfg || return 1
served_by g1 "$sd"
wait_gone g1 240
grants_released stordom
xl shutdown stordom
wait_gone stordom 60
