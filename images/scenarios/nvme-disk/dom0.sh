# `make run`: stordom, an HVM driver domain owning a passed-through NVMe
# (and an AHCI controller), serves namespace 1 to a stock Linux guest.
assign_controllers || return 1
# shellcheck disable=SC2086 # a list of PCI functions
start_hvm_stordom $STORDOM_PCI || return 1
domain_create /scenario/g1.cfg || return 1
served_by g1 "$sd"
wait_gone g1 400
grants_released stordom
xl shutdown stordom
wait_gone stordom 60
