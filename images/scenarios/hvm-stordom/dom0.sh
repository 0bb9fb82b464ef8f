# stordom as an HVM guest (issue 9's first step): booted by OVMF and GRUB,
# it serves a stock Linux guest's disk like the PVH stordom.
start_hvm_stordom || return 1
# Its early lines, before the PV console, go to the 0xe9 port, which Xen
# prints ((dN) in its log); the serial file holds the firmware's.
# Without its "(dN) " (the runner splits serial lines there).
if line=$(xl dmesg | grep -a -m1 "multiboot2 boot") && line=${line#(d*) }; then
    result hvm-boot pass "$line; $(grep -a -m1 'boot complete' "$(domain_console stordom)")"
else
    result hvm-boot fail "no multiboot2 boot line from stordom in xl dmesg"
fi
domain_create /scenario/g1.cfg || return 1
served_by g1 "$sd"
wait_gone g1 240
grants_released stordom
xl shutdown stordom
wait_gone stordom 60
