# Two stordom builds on one passed-through NVMe, taking turns: each round
# starts one build as the HVM driver domain, runs the guest's job on it
# and shuts it down (the controller goes back to pciback for the other).
assign_controllers || return 1
sed -e 's/^name = .*/name = "g-stordom-b"/' -e 's/backend=stordom,/backend=stordom-b,/' \
    /scenario/g-stordom.cfg >/tmp/ab-g-stordom-b.cfg
for round in 1 2 3; do
    for be in stordom stordom-b; do
        cfg=/scenario/g-stordom.cfg
        [ $be = stordom ] || cfg=/tmp/ab-g-stordom-b.cfg
        # shellcheck disable=SC2086 # a list of PCI functions
        HVM_NAME=$be HVM_EFI=/usr/local/bin/$be.efi start_hvm_stordom $STORDOM_PCI || return 1
        stordom_profile_mark $be
        domain_create $cfg || return 1
        wait_gone g-$be 300
        stordom_profile_report $be
        xl shutdown $be
        wait_gone $be 60
    done
done
